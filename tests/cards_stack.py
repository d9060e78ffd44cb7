"""
A simulated host with several cards in this process and a real
``twistd -n mgpumanager`` in front of it, reading the cards' state file
(``--simulated-card``), for the end-to-end suites of several cards.

Jobs get their length from their body, so a test controls how long each one
holds its cards: Ollama makes ``num_lines`` tokens ``interval`` seconds apart,
ComfyUI samples for ``work_seconds``; mvoice's jobs last its profile's
``work_seconds``.  ComfyUI answers ``POST /prompt`` at once, as the real one
does, and its job holds the card until the image is made: when a job ended
is read at the card (:mod:`tests.card_timeline`) or from the daemon going idle.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import attrs
import treq
from twisted.internet import reactor

from mgpumanager.simulate.consumers import fake_wav
from mgpumanager.simulate.host import HostConfig, SimulatedHost
from tests.card_timeline import CardTimeline, watch_cards
from tests.daemon import Daemon
from tests.support import sleep
from tests.support import until_idle as idle_status


@attrs.frozen
class CardsStack:
    host: SimulatedHost
    daemon: Daemon
    cards: list[CardTimeline]

    def url(self, path: str) -> str:
        return self.daemon.url + path


def two_card_host(tmp_path: Path, cards_mib: tuple[int, ...] = (24576, 24576),
                  voice_seconds: float = 0.02, **changes: Any) -> HostConfig:
    """The fast host on two cards (placement: ComfyUI on card 1, the rest on 0)."""
    config = HostConfig.fast(
        total_mib=cards_mib[0], cards_mib=cards_mib, state_path=str(tmp_path / "cards.json"),
        audio_dir=str(tmp_path / "audio"), **changes,
    )
    return attrs.evolve(config, voice=attrs.evolve(config.voice, work_seconds=voice_seconds))


@asynccontextmanager
async def cards_stack(
    tmp_path: Path, config: HostConfig,
    edit: Callable[[dict[str, Any]], None] = lambda document: None,
) -> AsyncIterator[CardsStack]:
    """
    Start the host and the daemon in front of it, both healthy; stop both after.

    :param edit: changes the daemon's config document before it is written.
    """
    host = SimulatedHost(config)
    cards = watch_cards(host)
    await host.start(reactor)
    document = host.daemon_config()
    document["gpu"]["poll_interval_seconds"] = 0.05
    document["lifecycle"].update(verify_interval_seconds=0.05, settle_seconds=0.05)
    document["queue"] = {"max_depth": 512, "max_wait_seconds": 60}
    # Equal priorities: what a test shows is the scheduler's, not mvoice's head start.
    document["consumers"]["mvoice"].pop("priority")
    edit(document)
    assert config.state_path is not None
    daemon = Daemon(document, tmp_path, ("--simulated-card", config.state_path))
    try:
        daemon.start()
        stack = CardsStack(host, daemon, cards)
        await until_healthy(stack)
        yield stack
    finally:
        if daemon.process is not None:
            daemon.stop()
        await host.stop()


async def status(stack: CardsStack) -> dict[str, Any]:
    document: dict[str, Any] = await (await treq.get(stack.url("/v1/status"))).json()
    return document


async def until_healthy(stack: CardsStack, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while True:
        document = await status(stack)
        if all(c["healthy"] for c in document["consumers"]) and "err" not in document["gpu"]:
            return
        assert time.monotonic() < deadline, f"daemon never saw a healthy host: {document}"
        await sleep(0.05)


async def until_idle(stack: CardsStack, within: float = 30.0) -> dict[str, Any]:
    """
    Wait until no job runs or waits: a ComfyUI job is answered with its
    ``prompt_id`` at once and holds its card until the image is made.
    """
    return await idle_status(lambda: status(stack), within)


def llm_body(seconds: float, tokens: int = 10) -> bytes:
    """An Ollama generation that computes for about ``seconds``."""
    return json.dumps({"prompt": "hello", "stream": False, "num_lines": tokens,
                       "interval": seconds / tokens}).encode()


def image_body(seconds: float) -> bytes:
    """A ComfyUI prompt that samples for ``seconds``."""
    return json.dumps({"prompt": {"seed": 1}, "work_seconds": seconds}).encode()


def tts_body() -> bytes:
    return json.dumps({"text": "hello there"}).encode()


def stt_body() -> bytes:
    return fake_wav("a short clip to transcribe")


async def send(stack: CardsStack, kind: str, body: bytes) -> tuple[int, bytes]:
    """One job through the daemon; its status and whole body."""
    response = await treq.post(stack.url(f"/v1/{kind}"), data=body, timeout=45)
    return response.code, await response.content()
