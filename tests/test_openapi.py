"""
``GET /v1/openapi.json`` kept true: schemathesis runs against the real daemon
(``twistd -n mgpumanager``) with an explicit list of checks, a fixed seed and
a bounded number of examples.  The daemon's one consumer is an echo stand-in
that needs no memory and has no load or unload route, so fuzzing the job
routes never unloads or loads anything.  ``/v1/events`` (a stream without an
end) and the passthrough are left out.
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

from mgpumanager.config.document import ENDPOINT_KINDS, parse_config
from mgpumanager.web.openapi import openapi_document
from tests.daemon import Daemon

SCHEMATHESIS = str(Path(sys.executable).with_name("schemathesis"))
CHECKS = "status_code_conformance,content_type_conformance,response_schema_conformance"


class Echo(Resource):
    """Answers every request with what it was asked, as JSON."""

    isLeaf = True

    def render(self, request: Request) -> bytes:
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
def echo_port() -> Iterator[int]:
    port = reactor.listenTCP(0, Site(Echo()), interface="127.0.0.1")
    yield port.getHost().port
    port.stopListening()


def test_the_document_names_every_route_and_the_error_envelope() -> None:
    config = parse_config(daemon_config(9))
    document = openapi_document(config)
    assert document["openapi"].startswith("3.1")
    paths = document["paths"]
    for kind in ENDPOINT_KINDS:
        assert set(paths[f"/v1/{kind}"]["post"]["responses"]) == {"default"}
    for own in ("/v1/status", "/v1/plan/{kind}", "/v1/events", "/v1/openapi.json",
                "/metrics", "/healthz", "/"):
        assert "200" in paths[own]["get"]["responses"], own
    assert config.audio_path_prefix + "{name}" in paths
    assert document["components"]["schemas"]["Error"]["required"] == [
        "error", "message", "retryable"]


@pytest_twisted.ensureDeferred
async def test_schemathesis_finds_the_daemon_true_to_its_document(
    tmp_path: Path, echo_port: int
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
             "--exclude-path", "/v1/events", "--exclude-path-regex", "^/upstream/",
             "--request-timeout", "10", "--no-color"],
            capture_output=True, text=True, timeout=240, cwd=tmp_path,
        )
    finally:
        daemon.stop()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    tested = re.search(r"Tested: (\d+)", run.stdout)
    assert tested is not None and int(tested.group(1)) >= 10, run.stdout
