"""
The end-to-end stage most suites share: three scripted consumers (voice for
tts/stt and audio, llm, image) on loopback and a real ``twistd -n mgpumanager``
in front of them, configured per suite.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from tests.daemon import Daemon
from tests.upstream import ScriptedUpstream, Tracker, listen

PATHS = {
    "voice": {"tts": {"path": "/api/tts"}, "stt": {"path": "/api/stt"}},
    "llm": {"llm": {"path": "/api/generate"}},
    "image": {"image": {"path": "/prompt"}},
}


@attrs.define
class ScriptedStack:
    daemon: Daemon
    upstreams: dict[str, ScriptedUpstream]
    tracker: Tracker
    ports: dict[str, int]
    listening: list[Any]
    #: Headers every request of the suite carries (a bearer token, say).
    headers: dict[str, str] = attrs.Factory(dict)

    def url(self, path: str) -> str:
        return self.daemon.url + path

    def stop(self) -> int:
        """Stop the daemon (returning its exit status), then the consumers."""
        code = self.daemon.stop()
        for port in self.listening:
            pytest_twisted.blockon(port.stopListening())
        return code


def start_stack(
    workdir: Path,
    config: dict[str, Any] | None = None,
    consumers: dict[str, dict[str, Any]] | None = None,
    headers: dict[str, str] | None = None,
) -> ScriptedStack:
    """
    Start the consumers and the daemon and wait until every consumer is
    probed healthy.  ``config`` adds top-level keys; ``consumers`` adds keys
    to a consumer's entry.
    """
    tracker = Tracker()
    upstreams = {name: ScriptedUpstream(name, tracker) for name in PATHS}
    listening = {name: listen(upstream) for name, upstream in upstreams.items()}
    ports = {name: port.getHost().port for name, port in listening.items()}
    document: dict[str, Any] = {
        "probes": {"interval_seconds": 0.5, "timeout_seconds": 3},
        "shutdown_grace_seconds": 3,
        "routing": {"tts": "voice", "stt": "voice", "llm": "llm", "image": "image"},
        "audio_proxy": "voice",
        "consumers": {
            name: {
                "url": f"http://127.0.0.1:{ports[name]}",
                "health": {"path": "/health"},
                "paths": copy.deepcopy(paths),
                **(consumers or {}).get(name, {}),
            }
            for name, paths in PATHS.items()
        },
        **(config or {}),
    }
    daemon = Daemon(document, workdir)
    daemon.start()
    stack = ScriptedStack(daemon, upstreams, tracker, ports, list(listening.values()),
                          dict(headers or {}))
    pytest_twisted.blockon(Deferred.fromCoroutine(_healthy(stack)))
    return stack


async def _healthy(stack: ScriptedStack) -> None:
    """Every consumer probed healthy: a slow first probe must not fail a test."""
    for _ in range(200):
        response = await treq.get(stack.url("/v1/status"), headers=stack.headers)
        document = await response.json()
        if all(consumer["healthy"] for consumer in document["consumers"]):
            return
        await deferLater(reactor, 0.05, lambda: None)
    raise AssertionError(f"consumers never became healthy: {document}")
