"""
The simulated ComfyUI behaves like the real one over real loopback sockets: a prompt
is queued and answered at once, made by one worker, and reported in the history,
the queue and the progress WebSocket (read with the ``websocket-client`` library).
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import pytest_twisted
import treq
import websocket
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread

from mgpumanager.simulate.comfy_queue import tiny_png
from mgpumanager.simulate.host import HostConfig, SimulatedHost
from mgpumanager.simulate.websocket import (
    OP_PING,
    OP_PONG,
    OP_TEXT,
    WebSocketConnection,
    accept_key,
    encode_frame,
)
from tests.comfy_feed import messages_until_idle
from tests.simulate.test_simulate import body_json, eventually, started

GRAPH = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sim.safetensors"}},
    "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0]}},
    "8": {"class_type": "VAEDecode", "inputs": {}},
}


@pytest_twisted.async_yield_fixture
async def comfy_host(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    """A host whose ComfyUI answers prompts at once, as the real one does."""
    config = HostConfig.fast(audio_dir=str(tmp_path / "audio"), comfy_answers_when_done=False)
    config = attrs.evolve(config, comfy=attrs.evolve(config.comfy, work_seconds=0.2))
    host = await started(config)
    yield host
    await host.stop()


async def submit(url: str, **body: Any) -> dict[str, Any]:
    response = await treq.post(url + "/prompt", json={"prompt": GRAPH, **body})
    assert response.code == 200
    answer: dict[str, Any] = await body_json(response)
    return answer


async def post(url: str, document: object) -> int:
    response = await treq.post(url, data=json.dumps(document).encode())
    await response.content()
    code: int = response.code
    return code


async def history_of(url: str, prompt_id: str) -> dict[str, Any]:
    document: dict[str, Any] = await body_json(await treq.get(f"{url}/history/{prompt_id}"))
    return document


@pytest_twisted.ensureDeferred
async def test_a_prompt_is_answered_at_once_and_made_by_the_worker(
    comfy_host: SimulatedHost,
) -> None:
    url = comfy_host.urls()["comfyui"]
    answer = await submit(url)
    assert set(answer) == {"prompt_id", "number", "node_errors"}
    assert answer["node_errors"] == {}
    prompt_id = answer["prompt_id"]
    assert comfy_host.card.held_by("comfyui") == 0, "answered before the model loaded"
    assert await history_of(url, prompt_id) == {}

    await eventually(lambda: prompt_id in comfy_host.comfy.queue.history)
    entry = (await history_of(url, prompt_id))[prompt_id]
    assert entry["status"]["status_str"] == "success"
    assert entry["status"]["completed"] is True
    assert entry["prompt"][:3] == [answer["number"], prompt_id, GRAPH]
    images = entry["outputs"]["9"]["images"]
    assert images[0]["type"] == "output"
    assert comfy_host.card.held_by("comfyui") == 9000, "the model stays after the prompt"

    view = await treq.get(url + "/view", params={"filename": images[0]["filename"]})
    assert view.code == 200
    png = await view.content()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    width, height = struct.unpack("!II", png[16:24])
    assert (width, height) == (8, 8)
    assert zlib.decompress(png[41 : 41 + struct.unpack("!I", png[33:37])[0]])
    missing = await treq.get(url + "/view", params={"filename": "never-made.png"})
    assert missing.code == 404
    await missing.content()

    everything = await body_json(await treq.get(url + "/api/history"))
    assert list(everything) == [prompt_id]


@pytest_twisted.ensureDeferred
async def test_every_route_is_also_under_api(comfy_host: SimulatedHost) -> None:
    url = comfy_host.urls()["comfyui"]
    answer = await submit(url + "/api")
    queue = await body_json(await treq.get(url + "/api/queue"))
    assert [item[1] for item in queue["queue_running"] + queue["queue_pending"]] == [
        answer["prompt_id"]
    ]
    stats = await body_json(await treq.get(url + "/api/system_stats"))
    assert stats["devices"][0]["vram_total"] == 16384 * 1024 * 1024
    info = await body_json(await treq.get(url + "/api/object_info"))
    assert info["SaveImage"]["output_node"] is True


@pytest_twisted.ensureDeferred
async def test_an_uploaded_image_can_be_viewed(comfy_host: SimulatedHost) -> None:
    url = comfy_host.urls()["comfyui"]
    picture = tiny_png(3)
    response = await treq.post(
        url + "/api/upload/image",
        data={"type": "input"},
        files={"image": ("mask.png", "image/png", io.BytesIO(picture))},
    )
    assert await body_json(response) == {"name": "mask.png", "subfolder": "", "type": "input"}
    view = await treq.get(url + "/view", params={"filename": "mask.png", "type": "input"})
    assert await view.content() == picture
    refused = await treq.post(url + "/upload/image", json={"image": "not a form"})
    assert refused.code == 400
    await refused.content()


@pytest_twisted.ensureDeferred
async def test_a_body_without_a_prompt_is_refused_like_comfyui(comfy_host: SimulatedHost) -> None:
    response = await treq.post(comfy_host.urls()["comfyui"] + "/prompt", json={"client_id": "x"})
    assert response.code == 400
    answer = await body_json(response)
    assert answer["error"]["type"] == "no_prompt"
    assert answer["node_errors"] == {}
    assert comfy_host.comfy.prompts == 0


@pytest_twisted.ensureDeferred
async def test_free_waits_until_the_queue_has_drained(comfy_host: SimulatedHost) -> None:
    url = comfy_host.urls()["comfyui"]
    first, second = await submit(url), await submit(url)
    await eventually(lambda: comfy_host.card.held_by("comfyui") == 9000)
    free = {"unload_models": True, "free_memory": True}
    assert await post(url + "/free", free) == 200
    stats = await body_json(await treq.get(url + "/system_stats"))
    assert stats["devices"][0]["torch_vram_total"] == 9000 * 1024 * 1024
    assert comfy_host.comfy.frees == 0, "deferred while a prompt runs and one is pending"

    await eventually(lambda: second["prompt_id"] in comfy_host.comfy.queue.history)
    assert first["prompt_id"] in comfy_host.comfy.queue.history
    await eventually(lambda: comfy_host.card.held_by("comfyui") == 0)
    assert comfy_host.comfy.frees == 1
    stats = await body_json(await treq.get(url + "/system_stats"))
    assert stats["devices"][0]["torch_vram_total"] == 0


@pytest_twisted.ensureDeferred
async def test_queue_delete_clear_and_interrupt(comfy_host: SimulatedHost) -> None:
    url = comfy_host.urls()["comfyui"]
    running, kept, deleted, cleared = [await submit(url) for _ in range(4)]
    queue = await body_json(await treq.get(url + "/queue"))
    assert [item[1] for item in queue["queue_running"]] == [running["prompt_id"]]
    assert [item[1] for item in queue["queue_pending"]] == [
        kept["prompt_id"],
        deleted["prompt_id"],
        cleared["prompt_id"],
    ]
    assert queue["queue_pending"][0][0] == kept["number"]

    assert await post(url + "/queue", {"delete": [deleted["prompt_id"]]}) == 200
    pending = (await body_json(await treq.get(url + "/queue")))["queue_pending"]
    assert [item[1] for item in pending] == [kept["prompt_id"], cleared["prompt_id"]]

    # Interrupting another prompt's id leaves the running one alone.
    assert await post(url + "/interrupt", {"prompt_id": kept["prompt_id"]}) == 200
    assert comfy_host.comfy.queue.running is not None
    assert await post(url + "/api/interrupt", {"prompt_id": running["prompt_id"]}) == 200
    await eventually(lambda: running["prompt_id"] in comfy_host.comfy.queue.history)
    entry = (await history_of(url, running["prompt_id"]))[running["prompt_id"]]
    assert entry["status"]["status_str"] == "error"
    assert entry["status"]["completed"] is False
    assert "execution_interrupted" in [kind for kind, _ in entry["status"]["messages"]]
    assert entry["outputs"] == {}

    assert await post(url + "/queue", {"clear": True}) == 200
    await eventually(lambda: comfy_host.comfy.queue.remaining == 0)
    assert set(comfy_host.comfy.queue.history) == {running["prompt_id"], kept["prompt_id"]}
    assert await history_of(url, deleted["prompt_id"]) == {}


@pytest_twisted.ensureDeferred
async def test_the_websocket_reports_a_prompts_progress(comfy_host: SimulatedHost) -> None:
    url = comfy_host.urls()["comfyui"]
    ws_url = url.replace("http://", "ws://") + "/ws?clientId=watcher"

    def connect() -> tuple[websocket.WebSocket, dict[str, Any]]:
        socket = websocket.create_connection(ws_url, timeout=5)
        return socket, json.loads(socket.recv())

    socket, greeting = await deferToThread(connect)
    try:
        assert greeting == {
            "type": "status",
            "data": {"status": {"exec_info": {"queue_remaining": 0}}, "sid": "watcher"},
        }
        answer = await submit(url, client_id="watcher")

        messages = await deferToThread(messages_until_idle, socket)
        socket.ping(b"still there?")
        opcode, frame = await deferToThread(socket.recv_data_frame, True)
        assert (opcode, frame.data) == (websocket.ABNF.OPCODE_PONG, b"still there?")
    finally:
        await deferToThread(socket.close)

    of_prompt = [m for m in messages if m["type"] != "status"]
    assert [m["type"] for m in of_prompt] == [
        "execution_start",
        "execution_cached",
        "executing",
        "progress",
        "progress",
        "progress",
        "progress",
        "executed",
        "execution_success",
        "executing",
    ]
    assert all(m["data"]["prompt_id"] == answer["prompt_id"] for m in of_prompt)
    progress = [m["data"] for m in of_prompt if m["type"] == "progress"]
    assert [(p["value"], p["max"]) for p in progress] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert of_prompt[2]["data"]["node"] == "9"
    assert of_prompt[7]["data"]["output"]["images"][0]["filename"].endswith(".png")
    remaining = [
        m["data"]["status"]["exec_info"]["queue_remaining"]
        for m in messages
        if m["type"] == "status"
    ]
    assert remaining[0] == 1 and remaining[-1] == 0, "queue changes are broadcast"
    await eventually(lambda: comfy_host.comfy.websocket_clients == 0)


def test_websocket_frames_follow_rfc_6455() -> None:
    # The example of RFC 6455 section 1.3.
    assert accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    received: list[str] = []
    closed: list[bool] = []
    connection = WebSocketConnection(received.append, lambda: closed.append(True))
    transport = StringTransport()
    connection.makeConnection(transport)

    message = encode_frame(OP_TEXT, "héllo".encode(), mask=True)
    big = encode_frame(OP_TEXT, b"x" * 70000, mask=True)
    for byte in range(len(message)):  # a frame may arrive a byte at a time
        connection.dataReceived(message[byte : byte + 1])
    connection.dataReceived(big + encode_frame(OP_PING, b"p", mask=True))
    assert received == ["héllo", "x" * 70000]
    assert transport.value() == encode_frame(OP_PONG, b"p")

    transport.clear()
    connection.send_text("hi")
    assert transport.value() == b"\x81\x02hi", "servers send unmasked frames"
    transport.clear()
    connection.dataReceived(encode_frame(OP_TEXT, b"unmasked"))
    assert received == ["héllo", "x" * 70000], "an unmasked client frame is refused"
    assert transport.value().startswith(b"\x88\x02\x03\xea")  # close, 1002
    assert transport.disconnecting
