"""
The main port's route table walked route by route: every path the daemon
answers is declared once, and the body limit at header time, the guard's
verdict and the error shape of each route, in its plain and its
percent-encoded spelling, are the ones its declaration names.  Then over
loopback: an OpenAI route whose ``model`` picks a consumer with a limit of its
own holds the body to that consumer's limit.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from twisted.web.http_headers import Headers

from mgpumanager.config.document import ENDPOINT_KINDS
from mgpumanager.config.parsing import parse_config
from mgpumanager.web.api import main_port_routes
from mgpumanager.web.declare import Declared, Token
from mgpumanager.web.guard import Guard
from mgpumanager.web.routing import RouteTable
from tests.builders import consumer
from tests.web.test_upstream import Stage, start_stage, stop_stage

TOKEN = b"route-table-token"
DOCUMENT: dict[str, Any] = {
    "routing": {kind: "big" for kind in ENDPOINT_KINDS} | {"tts": "small"},
    "openai": {"chat": "big", "models": {"small-model": "small"}},
    "consumers": {
        "big": consumer(1, *ENDPOINT_KINDS, max_body_mib=64),
        "small": consumer(2, "tts", max_body_mib=2),
    },
    "limits": {"max_body_mib": 16},
}
CONFIG = attrs.evolve(parse_config(DOCUMENT), auth_token=TOKEN)
MiB = 2**20

#: A value for each kind of path argument, so that every route has a real path.
_SAMPLES = {"consumer": "small", "kind": "llm", "rest": "a/b", "name": "clip.wav", "index": "0"}


def sample_paths(declared: Declared) -> Iterator[str]:
    """Concrete paths a route answers, one per choice of an ``any(...)`` part."""
    choices = re.search(r"<any\(([^)]*)\):\w+>", declared.path)
    options = choices.group(1).split(",") if choices else [""]
    for option in options:
        path = re.sub(r"<any\([^)]*\):\w+>", option, declared.path)
        yield re.sub(r"<(?:\w+:)?(\w+)>", lambda m: _SAMPLES[m.group(1)], path)


def percent_encoded(path: str) -> str:
    """The same path with the first letter of every segment percent-encoded."""
    return "/".join(
        f"%{ord(part[0]):02X}{part[1:]}" if part[:1].isalpha() else part
        for part in path.split("/")
    )


def method_of(declared: Declared) -> bytes:
    return (declared.methods or ("POST",))[0].encode()


def routes() -> Iterator[tuple[Declared, str]]:
    table = main_port_routes(CONFIG)
    for declared in table.declared:
        for path in sample_paths(declared):
            yield declared, path


ROUTES = list(routes())


def test_every_route_is_declared_once() -> None:
    table = main_port_routes(CONFIG)
    spellings = [(d.path, m) for d in table.declared for m in (d.methods or ("*",))]
    assert len(spellings) == len(set(spellings))
    # The paths the daemon has always answered, each found in the table.
    for method, path in [(b"POST", "/v1/tts"), (b"GET", "/v1/status"), (b"GET", "/"),
                         (b"GET", "/v1/plan/llm"), (b"GET", "/healthz"), (b"GET", "/metrics"),
                         (b"GET", "/v1/events"), (b"GET", "/v1/openapi.json"),
                         (b"GET", "/api/audio/x.wav"), (b"POST", "/v1/chat/completions"),
                         (b"GET", "/v1/models"), (b"PUT", "/upstream/big/x")]:
        assert table.lookup(method, path.encode()).declared in table.declared, path


@pytest.mark.parametrize(("declared", "path"), ROUTES, ids=[p for _, p in ROUTES])
def test_each_spelling_of_a_route_finds_its_declaration(declared: Declared, path: str) -> None:
    table = main_port_routes(CONFIG)
    method = method_of(declared)
    for spelling in (path, percent_encoded(path)):
        found = table.lookup(method, spelling.encode())
        assert found.declared is not None
        assert (found.declared.path, found.declared.policy) == (declared.path, declared.policy)


@pytest.mark.parametrize(("declared", "path"), ROUTES, ids=[p for _, p in ROUTES])
def test_limit_guard_and_shape_come_from_the_declaration(declared: Declared, path: str) -> None:
    table = main_port_routes(CONFIG)
    guard = Guard(CONFIG, True, table)
    method = method_of(declared)
    policy = declared.policy
    args = dict(table.lookup(method, path.encode()).args)
    reachable = list(policy.limit(CONFIG, args))
    expected = max((CONFIG.body_limit_of(c) for c in reachable), default=16 * MiB)
    for spelling in (path, percent_encoded(path)):
        target = spelling.encode()
        assert table.body_limit(method, target + b"?q=1") == expected, spelling
        assert table.error_shape(method, target) is policy.shape, spelling
        bare = Headers({b"host": [b"localhost:8770"]})
        refused = guard.refusal(method, target, bare)
        assert (refused is None) is (policy.token is Token.OPEN), spelling
        cookie = Headers({b"host": [b"localhost:8770"],
                          b"cookie": [b"mgpumanager_token=" + TOKEN]})
        by_cookie = guard.refusal(b"GET", target, cookie)
        opens = policy.token is not Token.BEARER and b"GET" in _methods(declared)
        if policy.token is not Token.OPEN:
            assert (by_cookie is None) is opens, spelling


def _methods(declared: Declared) -> set[bytes]:
    return {m.encode() for m in declared.methods or ("GET", "POST")}


def test_the_job_limits_follow_the_routed_consumer_in_either_spelling() -> None:
    table = main_port_routes(CONFIG)
    assert table.body_limit(b"POST", b"/v1/tts") == 2 * MiB
    assert table.body_limit(b"POST", b"/v1/%74ts") == 2 * MiB
    assert table.body_limit(b"POST", b"/v1/llm") == 64 * MiB
    assert table.body_limit(b"POST", b"/v1/%6Clm") == 64 * MiB
    assert table.body_limit(b"POST", b"/v1%2Fllm") == 16 * MiB, "no route: the global limit"


def test_a_reload_that_moves_the_audio_prefix_moves_its_route() -> None:
    table: RouteTable = main_port_routes(CONFIG)
    moved = attrs.evolve(CONFIG, audio_path_prefix="/files/")
    table.reconfigure(moved)
    assert table.lookup(b"GET", b"/files/x.wav").declared is not None
    assert table.lookup(b"GET", b"/api/audio/x.wav").declared is None


@pytest_twisted.async_yield_fixture
async def stage() -> AsyncIterator[Stage]:
    document = {
        "openai": {"chat": "small", "models": {"big-model": "big"}},
        "consumers": {
            "big": consumer(0, "llm", max_body_mib=64) | {"url": "http://127.0.0.1:{big}"},
            "small": consumer(0, "llm", max_body_mib=1) | {"url": "http://127.0.0.1:{small}"},
        },
    }
    ready = await start_stage(document, ("big", "small"))
    yield ready
    await stop_stage(ready)


def _chat(model: str, size: int) -> bytes:
    return b'{"model": "%s", "messages": [], "pad": "%s"}' % (model.encode(), b"x" * size)


@pytest_twisted.ensureDeferred
async def test_an_openai_route_holds_the_body_to_the_consumer_it_reaches(stage: Stage) -> None:
    headers = {"content-type": "application/json"}
    chat = stage.url + "/v1/chat/completions"
    # Small enough to read: "big-model" sends it to big, past small's 1 MiB.
    routed = await treq.post(chat, data=_chat("big-model", 900_000), headers=headers)
    assert (await routed.json())["server"] == "big"
    # Too large to read for its model, so it goes by its path, to small: that
    # consumer's limit holds it, although the route may reach big's 64 MiB.
    too_big = _chat("big-model", 3 * MiB // 2)
    refused = await treq.post(chat, data=too_big, headers=headers)
    assert refused.code == 413
    error = (await refused.json())["error"]
    assert error["code"] == "body_too_large" and "1 MiB" in error["message"]
    assert error["consumer"] == "small"
    assert stage.servers["small"].seen == []
    assert [seen["body"].encode("latin-1") for seen in stage.servers["big"].seen] == [
        _chat("big-model", 900_000)
    ]
