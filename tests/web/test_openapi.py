"""
``GET /v1/openapi.json`` kept true: schemathesis runs against the real daemon
(``twistd -n mgpumanager``) with an explicit list of checks, a fixed seed and
a bounded number of examples.  The daemon's one consumer is an echo stand-in
that needs no memory and has no load or unload route, so fuzzing the job
routes never unloads or loads anything; it answers every request it is
passed through with what it was asked.  Only ``/v1/events`` (a stream
without an end) is left out.

The document itself is generated from the route table, so the first tests
walk the table and find every route in it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mgpumanager.config.document import ENDPOINT_KINDS, Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.web.api import main_port_routes
from mgpumanager.web.declare import Does
from mgpumanager.web.openapi import ANY_METHOD, openapi_document, own_answers
from mgpumanager.web.ports import ConsumerPort
from mgpumanager.web.routing import RouteTable
from tests.daemon import Daemon
from tests.web.test_route_table import sample_paths

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CHECKS = "status_code_conformance,content_type_conformance,response_schema_conformance"


class Echo(Resource):
    """Answers every request with what it was asked, as JSON."""

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.methods: set[str] = set()

    def render(self, request: Request) -> bytes:
        self.methods.add(request.method.decode())
        request.setHeader(b"content-type", b"application/json")
        return json.dumps({"method": request.method.decode(), "path": request.uri.decode(
            "latin-1")}).encode()


def daemon_config(echo_port: int) -> dict[str, Any]:
    url = f"http://127.0.0.1:{echo_port}"
    return {
        "gpu": {"total_mib": 8192},
        "routing": dict.fromkeys(ENDPOINT_KINDS, "echo"),
        "audio_proxy": "echo",
        "consumers": {
            "echo": {
                "url": url,
                "health": {"path": "/health"},
                "paths": {kind: {"path": f"/{kind}"} for kind in ENDPOINT_KINDS},
                "vram_resident_mib": 0,
            },
        },
    }


@pytest.fixture
def echo() -> Echo:
    return Echo()


@pytest.fixture
def echo_port(echo: Echo) -> Iterator[int]:
    port = reactor.listenTCP(0, Site(echo), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def document_of(config: Config) -> dict[str, Any]:
    ports = RouteTable([ConsumerPort], config)
    return openapi_document(config, main_port_routes(config).declared, ports.declared)


def template_regex(template: str) -> re.Pattern[str]:
    """A documented path as a pattern a concrete path matches (a parameter: one or more chars)."""
    parts = re.split(r"\{\w+\}", template)
    return re.compile("^" + ".+".join(re.escape(part) for part in parts) + "$")


def test_every_route_of_the_table_is_in_the_document_with_its_methods() -> None:
    config = parse_config(daemon_config(9))
    document = document_of(config)
    table = main_port_routes(config)
    assert table.declared
    for declared in table.declared:
        methods = [m.lower() for m in declared.methods] if declared.methods else ANY_METHOD
        assert declared.policy.summary, declared.path
        for path in sample_paths(declared):
            path = path.replace("/small", "/echo")
            documented = [t for t in document["paths"] if template_regex(t).match(path)]
            assert documented, f"{path} ({declared.path}) is not in the document"
            for template in documented:
                operations = document["paths"][template]
                if set(methods) <= set(operations):
                    break
            else:
                raise AssertionError(f"{path}: {methods} not all documented in {documented}")
            operation = operations[methods[0]]
            assert operation["summary"] == declared.policy.summary
            assert operation["x-mgpumanager"]["does"] == declared.policy.does.value


def test_own_routes_have_their_answers_and_proxied_ones_a_default() -> None:
    config = parse_config(daemon_config(9))
    paths = document_of(config)["paths"]
    for declared in main_port_routes(config).declared:
        if declared.policy.does is Does.OWN:
            assert own_answers(declared) is not None, f"{declared.path} has no documented answer"
    for kind in ENDPOINT_KINDS:
        assert set(paths[f"/v1/{kind}"]["post"]["responses"]) == {"default"}
    for own in ("/v1/status", "/v1/plan/{kind}", "/v1/events", "/v1/openapi.json",
                "/metrics", "/healthz", "/", "/v1/models"):
        assert "200" in paths[own]["get"]["responses"], own
    for relayed in ("/upstream/{consumer}/{rest}", "/upstream/{consumer}",
                    "/v1/chat/completions", "/v1/audio/speech", "/v1/images/generations",
                    config.audio_path_prefix + "{name}"):
        for operation in paths[relayed].values():
            assert set(operation["responses"]) == {"default"}, relayed
    (consumer,) = paths["/upstream/{consumer}/{rest}"]["get"]["parameters"][:1]
    assert consumer["schema"]["enum"] == ["echo"]
    assert paths["/v1/plan/{kind}"]["get"]["parameters"][0]["schema"]["enum"] == list(
        ENDPOINT_KINDS)


def test_the_error_envelopes_and_the_consumer_ports_note() -> None:
    document = document_of(parse_config(daemon_config(9)))
    assert document["openapi"].startswith("3.1")
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error", "message", "retryable"]
    assert schemas["OpenAIError"]["properties"]["error"]["required"] == [
        "message", "type", "code"]
    with_port = daemon_config(9)
    with_port["consumers"]["echo"]["listen"] = "127.0.0.1:18999"
    ports = document_of(parse_config(with_port))["x-consumer-ports"]
    assert ports["ports"] == {"echo": "127.0.0.1:18999"}
    assert ports["paths"] == ["/", "/{rest}"]
    assert "/upstream/<name>/" in ports["description"]


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_the_daemon_true_to_its_document(
    tmp_path: Path, echo: Echo, echo_port: int
) -> None:
    daemon = Daemon(daemon_config(echo_port), tmp_path)
    try:
        daemon.start()
        served = await (await treq.get(daemon.url + "/v1/openapi.json")).json()
        assert served["paths"]["/v1/status"]["get"]["responses"]["200"]
        run = await deferToThread(
            subprocess.run,
            [SCHEMATHESIS, "run", daemon.url + "/v1/openapi.json",
             "--checks", CHECKS, "--seed", "20261201", "--max-examples", "10",
             "--exclude-path", "/v1/events",
             # A yield holds the card until resumed: every job fuzzed after it
             # would wait out its queue timeout (its own tests drive it).
             "--exclude-path", "/v1/gpus/{index}/yield",
             "--request-timeout", "10", "--no-color"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )
    finally:
        daemon.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    # Every operation but the event stream's and the yield's (POST and
    # DELETE) was tested: the proxied routes too.
    tested = re.search(r"Tested: (\d+)", run.stdout)
    selected = re.search(r"(\d+) selected / (\d+) total", run.stdout)
    assert tested is not None and selected is not None, run.stdout
    assert int(tested.group(1)) == int(selected.group(1)) == int(selected.group(2)) - 3
    assert int(tested.group(1)) >= 40, run.stdout
    # The passthrough was fuzzed through to the consumer, method by method.
    assert {"GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"} <= echo.methods
