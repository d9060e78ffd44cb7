"""
The passthrough, ``/upstream/<consumer>/…``, over real loopback sockets: raw
paths and queries reach the consumer byte for byte, the adapter decides on a
normalised copy what waits for the GPU, and what is not a GPU job never
waits behind one.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from functools import partial
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
from treq.client import HTTPClient
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.web.client import Agent, ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from mgpumanager.consumers.control import ConsumerControl
from mgpumanager.relay.endpoints import ReusedEndpoints
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.relay.tunnel import WebSocketTunnels
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.state.registry import Registry
from mgpumanager.web.api import main_port_routes
from mgpumanager.web.jobs import GpuJobs
from mgpumanager.web.openai_routes import OpenAIRoutes
from mgpumanager.web.passthrough import Passthrough
from mgpumanager.web.routing import RouteTable
from mgpumanager.web.site import ManagerSite
from tests.builders import consumer


class RecordingServer(Resource):
    """
    A consumer that answers every request with what it received, as JSON;
    a path containing ``hold`` is answered only when :meth:`release` is called.
    """

    isLeaf = True

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name
        self.seen: list[dict[str, Any]] = []
        self.held: list[Request] = []

    def render(self, request: Request) -> bytes | int:
        assert request.content is not None
        record = {
            "server": self.name,
            "method": request.method.decode(),
            "uri": request.uri.decode("latin-1"),
            "body": request.content.read().decode("latin-1"),
            "authorization": request.getHeader(b"authorization"),
        }
        self.seen.append(record)
        request.setHeader(b"content-type", b"application/json")
        if b"/v1/models" in request.uri:
            return json.dumps({"object": "list", "data": [
                {"id": "shared", "owned_by": self.name}, {"id": self.name, "owned_by": self.name}
            ]}).encode()
        if b"hold" in request.uri:
            self.held.append(request)
            return NOT_DONE_YET
        return json.dumps(record).encode()

    def release(self) -> None:
        held, self.held = self.held, []
        for request in held:
            request.write(b'{"released": true}')
            request.finish()


@attrs.define
class Stage:
    """A main-port site with the passthrough and OpenAI routes in front of consumers."""

    config: Config
    servers: dict[str, RecordingServer]
    scheduler: GpuScheduler
    passthrough: Passthrough
    port: Any
    listening: list[Any]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}"


def listen_on_loopback(site: Site) -> Any:
    site.noisy = False
    return reactor.listenTCP(0, site, interface="127.0.0.1")


async def start_stage(document: dict[str, Any], names: tuple[str, ...]) -> Stage:
    """
    Start one :class:`RecordingServer` per name, and the daemon's routes in
    front of them; ``document`` is the configuration, with ``{name}`` in a
    consumer's url replaced by that server's port.
    """
    servers = {name: RecordingServer(name) for name in names}
    listening = [listen_on_loopback(Site(server)) for server in servers.values()]
    ports = {name: p.getHost().port for name, p in zip(names, listening, strict=True)}
    for entry in document["consumers"].values():
        entry["url"] = entry["url"].format(**ports)
    config = parse_config(document)
    registry = Registry(config)
    scheduler = GpuScheduler(reactor, registry, queue=config.queue)
    agent = Agent.usingEndpointFactory(reactor, ReusedEndpoints(reactor, 5))
    proxy = ConsumerProxy(lambda _: agent, reactor)
    jobs = GpuJobs(registry, scheduler, proxy)
    passthrough = Passthrough(config, jobs, proxy, WebSocketTunnels(reactor, False))
    control = ConsumerControl(HTTPClient(agent), reactor, None)  # type: ignore[arg-type]
    routes = RouteTable([passthrough, OpenAIRoutes(config, jobs, control, 2.0)], config)
    site = ManagerSite(routes.resource, routes.body_limit, None, routes.error_shape)
    port = listen_on_loopback(site)
    return Stage(config, servers, scheduler, passthrough, port, [*listening, port])


async def stop_stage(stage: Stage) -> None:
    for server in stage.servers.values():
        server.release()
    for port in stage.listening:
        await port.stopListening()


OLLAMA_STYLE = {
    "consumers": {
        "llm": consumer(0, "llm", adapter="ollama") | {"url": "http://127.0.0.1:{llm}"},
        "plain": consumer(0, "tts", max_body_mib=1) | {"url": "http://127.0.0.1:{plain}"},
    }
}


@pytest_twisted.async_yield_fixture
async def stage() -> AsyncIterator[Stage]:
    started = await start_stage(json.loads(json.dumps(OLLAMA_STYLE)), ("llm", "plain"))
    yield started
    await stop_stage(started)


async def eventually(check: Any) -> None:
    for _ in range(400):
        if check():
            return
        await deferLater(reactor, 0.005)
    raise AssertionError("condition never became true")


@pytest_twisted.ensureDeferred
async def test_the_raw_path_and_query_reach_the_consumer_byte_for_byte(stage: Stage) -> None:
    raw = "/upstream/plain/view%2Fa/./b?filename=x%2Fy&type=&z=%20"
    response = await treq.get(stage.url + raw)
    assert response.code == 200
    seen = await response.json()
    assert seen["uri"] == "/view%2Fa/./b?filename=x%2Fy&type=&z=%20"


@pytest_twisted.ensureDeferred
async def test_the_consumer_root_without_a_slash_redirects_to_the_slash_form(
    stage: Stage,
) -> None:
    response = await treq.get(stage.url + "/upstream/plain?x=1", allow_redirects=False)
    assert response.code == 308
    assert response.headers.getRawHeaders("location") == ["/upstream/plain/?x=1"]
    assert stage.servers["plain"].seen == []


@pytest_twisted.ensureDeferred
async def test_an_unknown_consumer_is_not_found(stage: Stage) -> None:
    response = await treq.get(stage.url + "/upstream/nobody/api/tags")
    assert response.code == 404
    assert (await response.json())["error"] == "not_found"


@pytest_twisted.ensureDeferred
async def test_gpu_requests_queue_behind_the_lock_and_others_pass(stage: Stage) -> None:
    running = treq.post(stage.url + "/upstream/llm/api/generate?hold=1", data=b"{}")
    await eventually(lambda: stage.scheduler.in_flight == 1)
    # No spelling of a model route slips past the lock.
    sneaky = [
        treq.post(stage.url + path, data=b'{"prompt": "x"}')
        for path in ("/upstream/llm/api//chat", "/upstream/llm/api/./embed",
                     "/upstream/llm/api/%67enerate", "/upstream/llm/v1/chat/completions")
    ]
    await eventually(lambda: stage.scheduler.queue_depth == 4)
    tags = await treq.get(stage.url + "/upstream/llm/api/tags")
    assert tags.code == 200, "a model list never waits for the GPU"
    unload = await treq.post(
        stage.url + "/upstream/llm/api/generate", data=b'{"model": "m", "keep_alive": 0}'
    )
    assert (await unload.json())["body"] == '{"model": "m", "keep_alive": 0}'
    assert [s["uri"] for s in stage.servers["llm"].seen] == [
        "/api/generate?hold=1", "/api/tags", "/api/generate"
    ]
    stage.servers["llm"].release()
    assert (await running).code == 200
    for answer in sneaky:
        assert (await answer).code == 200
    assert stage.scheduler.total_jobs == 5


@pytest_twisted.ensureDeferred
async def test_a_body_read_to_classify_is_still_forwarded_whole(stage: Stage) -> None:
    body = b'{"model": "m", "prompt": "' + b"x" * 200_000 + b'", "keep_alive": 0}'
    response = await treq.post(stage.url + "/upstream/llm/api/generate", data=body)
    assert (await response.json())["body"].encode("latin-1") == body
    assert stage.scheduler.total_jobs == 1, "a prompt with keep_alive 0 still runs a model"


@pytest_twisted.ensureDeferred
async def test_the_consumers_body_limit_applies_on_the_passthrough(stage: Stage) -> None:
    response = await treq.post(stage.url + "/upstream/plain/tts", data=b"x" * (2 * 2**20))
    assert response.code == 413
    assert (await response.json())["error"] == "body_too_large"
    assert stage.servers["plain"].seen == []


def test_body_limits_follow_the_consumer_a_path_goes_to() -> None:
    config = parse_config({
        "openai": {"chat": "small"},
        "consumers": {"small": consumer(1, "llm", max_body_mib=2), "big": consumer(2, "tts")},
    })
    default = config.max_body_mib * 2**20
    body_limit_for_path = partial(main_port_routes(config).body_limit, b"POST")
    assert body_limit_for_path(b"/upstream/small/anything?x") == 2 * 2**20
    assert body_limit_for_path(b"/upstream/big/anything") == default
    assert body_limit_for_path(b"/v1/chat/completions") == 2 * 2**20
    assert body_limit_for_path(b"/upstream/nobody/x") == default


@pytest.mark.parametrize("method", ["GET", "DELETE", "PUT", "POST"])
@pytest_twisted.ensureDeferred
async def test_any_method_is_forwarded(stage: Stage, method: str) -> None:
    response = await treq.request(method, stage.url + "/upstream/plain/queue", data=b"")
    assert (await response.json())["method"] == method
    assert stage.scheduler.total_jobs == (1 if method == "POST" else 0), "generic: POST only"



@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_the_queue_frees_its_place(stage: Stage) -> None:
    running = treq.post(stage.url + "/upstream/llm/api/generate?hold=1", data=b"{}")
    await eventually(lambda: stage.scheduler.in_flight == 1)
    waiting = treq.post(stage.url + "/upstream/llm/api/chat?second=1", data=b"{}")
    await eventually(lambda: stage.scheduler.queue_depth == 1)
    waiting.cancel()
    await eventually(lambda: stage.scheduler.queue_depth == 0)
    stage.servers["llm"].release()
    assert (await running).code == 200
    assert all("second" not in s["uri"] for s in stage.servers["llm"].seen)
    with pytest.raises(ResponseNeverReceived):
        await waiting
