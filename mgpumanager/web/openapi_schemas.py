"""
The JSON schemas of the answers the daemon writes itself, for
:mod:`mgpumanager.web.openapi`: the status document, the plan, the model
list and the error envelope in both its shapes.
"""

from __future__ import annotations

from typing import Any

JsonObject = dict[str, Any]

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
        "gpus": {
            "type": "array", "items": {"type": "integer"},
            "description": "the cards its processes use",
        },
        "gpu_resident_mib_by_card": {
            "type": "object", "additionalProperties": {"type": "integer"},
            "description": "what it holds on each card, by card number: {\"0\": mib}",
        },
    },
}

_HOLDER: JsonObject = {
    "type": "object",
    "required": ["name", "size_mib"],
    "properties": {
        "name": {"type": "string"},
        "size_mib": {"type": "integer"},
    },
}

_CARD: JsonObject = {
    "type": "object",
    "required": ["index", "uuid", "name", "total_mib", "used_mib", "free_mib", "reserved_mib",
                 "holders", "guests", "guest_mib", "running", "yielded", "err"],
    "properties": {
        "index": {"type": "integer", "description": "the card's number in the configuration"},
        "uuid": {"type": ["string", "null"]},
        "name": {"type": ["string", "null"]},
        "total_mib": _NULLABLE_INT,
        "used_mib": _NULLABLE_INT,
        "free_mib": _NULLABLE_INT,
        "reserved_mib": {"type": "integer"},
        "last_sample": _NULLABLE_TIME,
        "holders": {
            "type": "array", "items": _HOLDER,
            "description": "memory of consumers a reload removed, seen on this card",
        },
        "guests": {
            "type": "array",
            "description": "processes on the card that belong to no consumer",
            "items": {
                "type": "object",
                "required": ["pid", "name", "mib"],
                "properties": {
                    "pid": {"type": "integer"},
                    "name": {"type": "string"},
                    "mib": {"type": "integer"},
                },
            },
        },
        "guest_mib": {"type": "integer"},
        "running": {
            "type": ["integer", "null"], "description": "the id of the job holding the card",
        },
        "yielded": {
            "type": ["object", "null"],
            "properties": {
                "reason": {"type": "string"},
                "since": {"type": "string"},
                "until": _NULLABLE_TIME,
            },
        },
        "err": {"type": ["string", "null"], "description": "why the last read failed"},
    },
}

_CARDS_OF_JOB: JsonObject = {"type": "array", "items": {"type": "integer"}}

_RUNNING_JOB: JsonObject = {
    "type": "object",
    "required": ["id", "consumer", "kind", "phase", "started", "cards"],
    "properties": {
        "id": {"type": "integer"},
        "consumer": {"type": "string"},
        "kind": {"type": "string"},
        "phase": {"type": "string"},
        "started": {"type": "string"},
        "cards": _CARDS_OF_JOB,
    },
}

STATUS: JsonObject = {
    "type": "object",
    "required": ["listen", "time", "gpu", "gpus", "unmanaged_cards", "routing", "consumers",
                 "scheduler"],
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
                    "items": _HOLDER,
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
        "gpus": {
            "type": "array", "items": _CARD,
            "description": "every managed card, in the file's order; gpu describes the first",
        },
        "unmanaged_cards": {
            "type": "integer", "description": "cards NVML lists that the file does not manage",
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
                "running": {
                    "anyOf": [_RUNNING_JOB, {"type": "null"}],
                    "description": "the earliest-started running job",
                },
                "running_jobs": {"type": "array", "items": _RUNNING_JOB},
                "queue": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "required": ["id", "consumer", "kind", "cards"],
                        "properties": {"cards": _CARDS_OF_JOB},
                    },
                },
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

OPENAI_ERROR: JsonObject = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "code": {"type": "string", "description": "a documented error code"},
                "consumer": {"type": ["string", "null"]},
                "retryable": {"type": "boolean"},
            },
        },
    },
}

MODELS: JsonObject = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {
        "object": {"const": "list"},
        "data": {
            "type": "array",
            "items": {
                "type": "object", "required": ["id"], "properties": {"id": {"type": "string"}},
            },
        },
    },
}

_YIELDED: JsonObject = {
    "type": ["object", "null"],
    "required": ["reason", "since", "until"],
    "properties": {
        "reason": {"type": "string"},
        "since": {"type": "string", "format": "date-time"},
        "until": {"type": ["string", "null"]},
    },
}

CARD_YIELD: JsonObject = {
    "type": "object",
    "required": ["card", "yielded", "free_mib"],
    "properties": {
        "card": {"type": "integer"},
        "yielded": _YIELDED,
        "free_mib": {"type": ["integer", "null"]},
    },
}
