"""
``GET /v1/openapi.json``: an OpenAPI 3.1 description of the daemon's own
routes, built from the configuration (the audio prefix and the job kinds are
configurable) and kept true by a schemathesis run in the test suite.

Routes whose answers are a consumer's are documented with ``default``
responses: the daemon relays whatever the consumer says, and only its own
errors have a shape of ours, the envelope.
"""

from __future__ import annotations

from typing import Any

from mgpumanager import __version__
from mgpumanager.common.errors import JSON_CONTENT_TYPE
from mgpumanager.config.document import ENDPOINT_KINDS, Config

JsonObject = dict[str, Any]

_JSON = JSON_CONTENT_TYPE.decode("ascii")
_NULLABLE_INT = {"type": ["integer", "null"]}
_NULLABLE_TIME = {"type": ["string", "null"]}

ERROR_ENVELOPE: JsonObject = {
    "type": "object",
    "required": ["error", "message", "retryable"],
    "properties": {
        "error": {"type": "string", "description": "a documented error code"},
        "message": {"type": "string"},
        "consumer": {"type": ["string", "null"]},
        "retryable": {"type": "boolean"},
    },
}

_CONSUMER: JsonObject = {
    "type": "object",
    "required": ["name", "url", "healthy", "loaded", "gpu_resident_mib", "vram_budget_mib",
                 "active", "total_requests", "loads", "unloads", "priority"],
    "properties": {
        "name": {"type": "string"},
        "url": {"type": "string"},
        "healthy": {"type": ["boolean", "null"]},
        "loaded": {"type": "boolean"},
        "gpu_resident_mib": {"type": "integer"},
        "peak_resident_mib": {"type": "integer"},
        "vram_budget_mib": {"type": "integer"},
        "vram_managed": {"type": "boolean"},
        "active": {"type": "integer"},
        "total_requests": {"type": "integer"},
        "loads": {"type": "integer"},
        "unloads": {"type": "integer"},
        "last_used": _NULLABLE_TIME,
        "last_probe": _NULLABLE_TIME,
        "last_error": {"type": "string"},
        "priority": {"type": "integer"},
        "can_coexist_with": {"type": "array", "items": {"type": "string"}},
        "warning": {"type": "string"},
    },
}

STATUS: JsonObject = {
    "type": "object",
    "required": ["listen", "time", "gpu", "routing", "consumers", "scheduler"],
    "properties": {
        "listen": {"type": "string"},
        "time": {"type": "string"},
        "gpu": {
            "type": "object",
            "required": ["total_mib", "used_mib", "free_mib", "reserved_mib"],
            "properties": {
                "total_mib": _NULLABLE_INT,
                "used_mib": _NULLABLE_INT,
                "free_mib": _NULLABLE_INT,
                "reserved_mib": {"type": "integer"},
                "last_sample": _NULLABLE_TIME,
                "holders": {
                    "type": "array",
                    "description": "memory of consumers a reload removed, until the card "
                    "shows it gone",
                    "items": {
                        "type": "object",
                        "required": ["name", "size_mib"],
                        "properties": {
                            "name": {"type": "string"},
                            "size_mib": {"type": "integer"},
                        },
                    },
                },
                "released_holders": {
                    "type": "array",
                    "description": "the latest holders that left the budget, newest last, "
                    "and the rule that let each go: processes_gone, card_dropped (the "
                    "card's used memory fell by 75 % of its size) or verify_timeout",
                    "items": {
                        "type": "object",
                        "required": ["name", "size_mib", "rule", "released"],
                        "properties": {
                            "name": {"type": "string"},
                            "size_mib": {"type": "integer"},
                            "rule": {
                                "type": "string",
                                "enum": ["processes_gone", "card_dropped", "verify_timeout"],
                            },
                            "released": {"type": "string", "format": "date-time"},
                        },
                    },
                },
            },
        },
        "routing": {"type": "object", "additionalProperties": {"type": "string"}},
        "consumers": {"type": "array", "items": _CONSUMER},
        "scheduler": {
            "type": "object",
            "required": ["queue_depth", "in_flight", "total_jobs"],
            "properties": {
                "queue_depth": {"type": "integer"},
                "in_flight": {"type": "integer"},
                "total_jobs": {"type": "integer"},
                "policy": {"type": "string", "enum": ["interactive-first", "fifo"]},
                "running": {"type": ["object", "null"]},
                "queue": {"type": "array", "items": {"type": "object"}},
                "decisions": {"type": "array", "items": {"type": "object"}},
            },
        },
    },
}

PLAN: JsonObject = {
    "type": "object",
    "required": ["kind", "target", "would_evict", "would_load", "steps"],
    "properties": {
        "kind": {"type": "string"},
        "target": {"type": "string"},
        "skip_make_room": {"type": ["string", "null"]},
        "would_evict": {"type": "array", "items": {"type": "string"}},
        "would_load": {"type": "boolean"},
        "load_by": {"type": ["string", "null"]},
        "steps": {"type": "array", "items": {"type": "object"}},
    },
}


def _json(description: str, schema: JsonObject) -> JsonObject:
    return {"description": description, "content": {_JSON: {"schema": schema}}}


def _text(description: str, media: str) -> JsonObject:
    return {"description": description, "content": {media: {"schema": {"type": "string"}}}}


def _error(description: str) -> JsonObject:
    return _json(description, {"$ref": "#/components/schemas/Error"})


def _relayed(summary: str, method: str, parameters: list[JsonObject] | None = None) -> JsonObject:
    """A route whose answer is the consumer's, relayed as it came."""
    operation: JsonObject = {
        "summary": summary,
        "responses": {"default": {"description": "the consumer's answer, relayed, or an "
                                                  "error of the daemon's own (the envelope)"}},
    }
    if parameters:
        operation["parameters"] = parameters
    if method == "post":
        operation["requestBody"] = {
            "description": "passed to the consumer unchanged",
            "content": {"*/*": {"schema": {}}},
        }
    return {method: operation}


def _get(summary: str, responses: JsonObject, parameters: list[JsonObject] | None = None,
         ) -> JsonObject:
    operation: JsonObject = {"summary": summary, "responses": responses}
    if parameters:
        operation["parameters"] = parameters
    return {"get": operation}


def _path_parameter(name: str, schema: JsonObject) -> JsonObject:
    return {"name": name, "in": "path", "required": True, "schema": schema}


def openapi_document(config: Config) -> JsonObject:
    """The OpenAPI 3.1 document for a daemon running ``config``."""
    kinds = list(ENDPOINT_KINDS)
    paths: JsonObject = {
        f"/v1/{kind}": _relayed(f"Run a {kind} job on the GPU (queued, made room for)", "post")
        for kind in kinds
    }
    paths["/v1/status"] = _get("The live state: card, consumers, queue, decisions",
                               {"200": _json("the status document", STATUS)})
    paths["/v1/plan/{kind}"] = _get(
        "What a job of this kind would evict and load now (a dry run)",
        {"200": _json("the plan", PLAN), "404": _error("no such kind"),
         "501": _error("no consumer serves the kind")},
        [_path_parameter("kind", {"type": "string", "enum": kinds})],
    )
    paths["/v1/events"] = _get(
        "The status document as Server-Sent Events, on each change",
        {"200": _text("an event stream; each data line is the status document",
                      "text/event-stream")})
    paths["/v1/openapi.json"] = _get("This document", {"200": _json("OpenAPI 3.1",
                                                                     {"type": "object"})})
    paths["/metrics"] = _get("Prometheus metrics", {"200": _text("the text format, 0.0.4",
                                                                 "text/plain")})
    paths["/healthz"] = _get("Liveness", {"200": _json("alive", {
        "type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}})})
    paths["/"] = _get("The status page for browsers (Accept: text/html), a summary otherwise", {
        "200": {"description": "the page or the summary", "content": {
            "text/html": {"schema": {"type": "string"}},
            "text/plain": {"schema": {"type": "string"}}}}})
    paths[config.audio_path_prefix + "{name}"] = {
        **_relayed("An audio file from the audio consumer", "get",
                   [_path_parameter("name", {"type": "string"})]),
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "mgpumanager", "version": __version__,
                 "description": "One GPU, several inference servers, one job at a time."},
        "paths": paths,
        "components": {"schemas": {"Error": ERROR_ENVELOPE}},
    }
