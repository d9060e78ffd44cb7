"""
The status page in a real browser.  The real daemon on the simulated host
(``twistd -n mgpumanager --simulate``) serves it and feeds it: every consumer
and the card shown, a job and its eviction within 2 s without a reload, and a
restart of the daemon survived.  A loopback stand-in that answers like the
daemon with documents each test chooses covers what the real one cannot be
made to do on demand: refuse the stream, show a queue and a running job.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest_twisted
import treq
from twisted.internet import reactor
from twisted.internet.error import ConnectionRefusedError
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

from mgpumanager.web.page import status_page
from tests.browser import LAPTOP, PHONE, Browser, browser_fixture  # noqa: F401
from tests.daemon import Daemon, demo_config_on_free_ports, free_port
from tests.support import sleep

TOKEN = "page-token-0123456789"


def status_document() -> dict[str, Any]:
    """A busy card as the daemon reports it: three resident consumers, one not."""

    def consumer(name: str, loaded: bool, measured: int, declared: int, **more: Any) -> Any:
        return {
            "name": name, "url": "http://127.0.0.1:9", "healthy": True, "loaded": loaded,
            "gpu_resident_mib": measured, "peak_resident_mib": measured,
            "vram_budget_mib": declared, "vram_managed": False, "active": 0,
            "total_requests": 3, "loads": 1, "unloads": 0, "last_used": None,
            "last_probe": "2026-12-01T10:00:00.000Z", "last_error": "", "priority": 0,
            "can_coexist_with": [], **more,
        }

    return {
        "listen": "127.0.0.1:8770",
        "time": "2026-12-01T10:00:00.000Z",
        "gpu": {"total_mib": 16384, "used_mib": 12500, "free_mib": 3884, "reserved_mib": 1024,
                "last_sample": "2026-12-01T10:00:00.000Z", "name": "Stand-in GPU"},
        "routing": {"tts": "mvoice", "stt": "whisper", "llm": "ollama", "image": "comfyui"},
        "consumers": [
            consumer("comfyui", False, 0, 9000),
            consumer("mvoice", True, 0, 3000, priority=2),
            consumer("ollama", True, 6000, 0, adapter="ollama", models=[
                {"name": "llama3.2:3b", "size_vram_mib": 6000, "expires_at": None}]),
            consumer("whisper", False, 0, 1500, healthy=False, last_error="connection refused"),
        ],
        "scheduler": {"queue_depth": 0, "in_flight": 0, "total_jobs": 12, "last_wait_ms": 4,
                      "last_run_ms": 670, "oldest_queued": None, "evictions": 0,
                      "decisions": []},
    }


def with_image_job(document: dict[str, Any]) -> dict[str, Any]:
    """The card after ComfyUI evicted mvoice and started a prompt; a TTS job waits."""
    changed = copy.deepcopy(document)
    changed["time"] = "2026-12-01T10:00:05.000Z"
    for entry in changed["consumers"]:
        if entry["name"] == "mvoice":
            entry.update(loaded=False, unloads=1)
        if entry["name"] == "comfyui":
            entry.update(loaded=True, gpu_resident_mib=9000, active=1)
    scheduler = changed["scheduler"]
    scheduler.update(policy="interactive-first", evictions=1, queue_depth=1, running={
        "id": "job-7", "consumer": "comfyui", "kind": "image", "class": "batch",
        "priority": 0, "phase": "completing", "prompt_id": "p-1",
        "started": "2026-12-01T10:00:02.000Z"})
    scheduler["queue"] = [{"id": "job-8", "consumer": "mvoice", "kind": "tts",
                           "class": "interactive", "priority": 2, "waited_ms": 1800,
                           "bypassed": 0, "needs_swap": True, "eta_seconds": 41}]
    scheduler["decisions"] = [{
        "type": "evict", "time": "2026-12-01T10:00:01.000Z", "target": "comfyui",
        "victim": "mvoice", "why": "NVML free 3884 MiB vs 9000 + 256 MiB cushion",
        "outcome": "unloaded", "unload_ms": 369, "candidates": [
            {"name": "mvoice", "eligible": True, "reason": "eligible"},
            {"name": "ollama", "eligible": False, "reason": "manages its own VRAM"}]}]
    return changed


def on_two_cards(document: dict[str, Any]) -> dict[str, Any]:
    """
    ``document`` on a host with two cards, as the daemon reports several:
    ComfyUI alone on card 1, the others on card 0; any running job and the
    queue on their consumers' cards.
    """
    changed = copy.deepcopy(document)
    cards_of = {"comfyui": [1]}
    for entry in changed["consumers"]:
        cards = cards_of.get(entry["name"], [0])
        mib = entry["gpu_resident_mib"] or (entry["vram_budget_mib"] if entry["loaded"] else 0)
        entry.update(gpus=cards, gpu_resident_mib_by_card={str(cards[0]): mib})
    scheduler = changed["scheduler"]
    running = scheduler.get("running")
    if running:
        running["cards"] = cards_of.get(running["consumer"], [0])
    scheduler["running_jobs"] = [running] if running else []
    for job in scheduler.get("queue", []):
        job["cards"] = cards_of.get(job["consumer"], [0])

    def card(index: int, used: int, **more: Any) -> dict[str, Any]:
        return {
            "index": index, "uuid": f"GPU-stand-in-{index}", "name": "Stand-in GPU",
            "total_mib": 16384, "used_mib": used, "free_mib": 16384 - used,
            "reserved_mib": 1024, "last_sample": changed["time"], "holders": [],
            "guests": [], "guest_mib": 0, "yielded": None, "err": None,
            "running": next((job["id"] for job in scheduler["running_jobs"]
                             if index in job["cards"]), None), **more,
        }

    held = [sum(c["gpu_resident_mib_by_card"].get(str(index), 0) for c in changed["consumers"])
            for index in (0, 1)]
    # Card 0 also carries 500 MiB of a process that is no consumer's.
    changed["gpus"] = [card(0, held[0] + 500), card(1, held[1])]
    changed["gpu"].update({k: changed["gpus"][0][k] for k in ("used_mib", "free_mib")})
    changed["unmanaged_cards"] = 0
    return changed


class StandInDaemon(Resource):
    """
    The daemon's page-facing routes over a real socket: the current document
    on ``/v1/status`` and pushed to every ``/v1/events`` stream on
    :meth:`publish`.  It can refuse the stream, and stop and start again on
    the same port like a restarted daemon.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.document = status_document()
        self.refuse_events = False
        self.paths: list[bytes] = []
        self.streams: list[Request] = []
        #: Every connection that made a request: a dying daemon drops them all.
        self.channels: set[Any] = set()
        self.port_number = 0
        self.port: Any = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port_number}/"

    def start(self) -> None:
        site = Site(self)
        site.log = lambda request: None  # type: ignore[method-assign]
        self.port = reactor.listenTCP(self.port_number, site, interface="127.0.0.1")
        self.port_number = self.port.getHost().port

    async def stop(self) -> None:
        """Stop listening and cut every connection, as a dying process does."""
        if self.port is None:
            return
        port, self.port = self.port, None
        await port.stopListening()
        for channel in self.channels:
            if channel.transport is not None:
                channel.transport.abortConnection()
        self.channels.clear()
        self.streams.clear()

    def publish(self, document: dict[str, Any]) -> None:
        self.document = document
        for stream in self.streams:
            stream.write(self._event())

    def _event(self) -> bytes:
        return b"data: " + json.dumps(self.document).encode() + b"\n\n"

    def render_GET(self, request: Request) -> bytes | int:
        self.paths.append(request.uri)
        self.channels.add(request.channel)
        if request.path == b"/":
            request.setHeader(b"content-type", b"text/html; charset=utf-8")
            return status_page()
        if request.path == b"/v1/status":
            request.setHeader(b"content-type", b"application/json")
            return json.dumps(self.document).encode()
        if request.path == b"/v1/events" and not self.refuse_events:
            request.setHeader(b"content-type", b"text/event-stream")
            request.setHeader(b"cache-control", b"no-store")
            request.write(b"retry: 1000\n\n" + self._event())
            self.streams.append(request)
            request.notifyFinish().addBoth(lambda _: self._forget(request))
            return NOT_DONE_YET
        request.setResponseCode(503 if request.path == b"/v1/events" else 404)
        request.setHeader(b"content-type", b"application/json")
        return b'{"error": "unavailable", "message": "refused", "retryable": true}'

    def _forget(self, request: Request) -> None:
        if request in self.streams:
            self.streams.remove(request)


@pytest_twisted.async_yield_fixture
async def daemon() -> AsyncIterator[StandInDaemon]:
    server = StandInDaemon()
    server.start()
    yield server
    await server.stop()


def state_of(driver: Any) -> str:
    return str(driver.find_element("id", "conn").get_attribute("data-state"))


def text_of(driver: Any, element_id: str) -> str:
    return str(driver.find_element("id", element_id).text)


async def open_live(browser: Browser, url: str) -> None:
    await browser.open(url)
    await browser.wait_until(lambda d: state_of(d) == "live", 3.0, "the event stream is live")


@pytest_twisted.ensureDeferred
async def test_a_pushed_job_and_eviction_show_without_a_reload(
    browser: Browser, daemon: StandInDaemon, tmp_path: Path
) -> None:
    await open_live(browser, daemon.url)
    await browser.script("window.notReloaded = true")
    daemon.publish(with_image_job(daemon.document))
    running = await browser.wait_until(
        lambda d: "comfyui" in text_of(d, "running") and text_of(d, "running"),
        2.0, "the running job appears",
    )
    assert "completing" in running
    decisions = await browser.call(lambda d: text_of(d, "decisions"))
    assert "mvoice → comfyui" in decisions
    assert "NVML free 3884 MiB vs 9000 + 256 MiB cushion" in decisions
    queue = await browser.call(lambda d: text_of(d, "queue"))
    assert "mvoice" in queue and "in 41 s" in queue
    residents = await browser.script(
        "return [...document.querySelectorAll('.seg[data-consumer]')].map(e => e.dataset.consumer)"
    )
    assert residents == ["comfyui", "ollama"]
    assert await browser.script("return window.notReloaded") is True
    await browser.screenshot(tmp_path / "status-busy.png")
    assert await browser.errors() == []


@pytest_twisted.ensureDeferred
async def test_falls_back_to_polling_when_the_event_stream_is_refused(
    browser: Browser, daemon: StandInDaemon
) -> None:
    daemon.refuse_events = True
    await browser.open(daemon.url)
    await browser.wait_until(lambda d: state_of(d) == "polling", 3.0, "polling")
    daemon.publish(with_image_job(daemon.document))
    await browser.wait_until(
        lambda d: "comfyui" in text_of(d, "running"), 3.0, "a poll shows the new job"
    )
    assert b"/v1/events" in daemon.paths
    assert await browser.errors(include_network=False) == []


@pytest_twisted.ensureDeferred
async def test_a_token_in_the_address_stays_out_of_later_requests(
    browser: Browser, daemon: StandInDaemon
) -> None:
    await open_live(browser, daemon.url + "?token=" + TOKEN)
    assert daemon.paths[0] == b"/?token=" + TOKEN.encode()
    assert daemon.paths[1:] and all(TOKEN.encode() not in path for path in daemon.paths[1:])
    assert TOKEN not in await browser.call(lambda d: d.current_url)


#: Every scheduler tile's value: its text, and whether it is cut off (wider than its box).
CLIPPED_TILES = (
    "return [...document.querySelectorAll('#scheduler .stat')].map(tile => {"
    " const value = tile.querySelector('.v');"
    " return [tile.querySelector('.k').textContent, value.textContent,"
    " value.scrollWidth > value.clientWidth]; })"
)


@pytest_twisted.ensureDeferred
async def test_the_scheduler_tiles_show_their_whole_values_on_a_laptop(
    browser: Browser, daemon: StandInDaemon, tmp_path: Path
) -> None:
    busy = with_image_job(daemon.document)
    busy["scheduler"].update(failed_jobs=1)  # every tile there is: the narrowest they get
    daemon.publish(busy)
    await open_live(browser, daemon.url)
    await browser.wait_until(lambda d: "comfyui" in text_of(d, "running"), 2.0, "the job")
    assert await browser.call(lambda d: d.execute_script("return window.innerWidth")) == LAPTOP[0]
    tiles = await browser.script(CLIPPED_TILES)
    assert ["policy", "interactive-first", False] in tiles
    assert [tile for tile in tiles if tile[2]] == []
    await browser.screenshot(tmp_path / "status-tiles.png")


@pytest_twisted.ensureDeferred
async def test_fits_a_phone_screen(
    browser: Browser, daemon: StandInDaemon, tmp_path: Path
) -> None:
    daemon.publish(with_image_job(daemon.document))
    await browser.resize(PHONE)
    try:
        await open_live(browser, daemon.url)
        overflow = await browser.script(
            "return document.documentElement.scrollWidth - window.innerWidth"
        )
        assert overflow <= 0
        assert [tile for tile in await browser.script(CLIPPED_TILES) if tile[2]] == []
        await browser.screenshot(tmp_path / "status-phone.png")
    finally:
        await browser.resize(LAPTOP)
    assert await browser.errors() == []


#: Each card's consumers on its bar, by card number.
BARS = """return Object.fromEntries([...document.querySelectorAll('.card[data-card]')].map(card =>
  [card.dataset.card, [...card.querySelectorAll('.seg[data-consumer]')]
    .map(e => e.dataset.consumer)]))"""


@pytest_twisted.ensureDeferred
async def test_two_cards_show_a_bar_each_the_running_jobs_and_the_queue_with_cards(
    browser: Browser, daemon: StandInDaemon, tmp_path: Path
) -> None:
    daemon.publish(on_two_cards(with_image_job(daemon.document)))
    await open_live(browser, daemon.url)
    bars = await browser.wait_until(lambda d: d.execute_script(BARS), 2.0, "the cards' bars")
    assert bars == {"0": ["ollama"], "1": ["comfyui"]}
    card_1 = await browser.call(lambda d: text_of(d, "card-1"))
    assert "Card 1" in card_1 and "job job-7" in card_1 and "free" in card_1
    assert "reserved" in await browser.call(lambda d: text_of(d, "card-0"))
    assert "card 1" in await browser.call(lambda d: text_of(d, "running"))
    queue = await browser.call(lambda d: text_of(d, "queue"))
    assert "cards" in queue and "mvoice" in queue
    comfyui = await browser.call(lambda d: d.find_element(
        "css selector", '.consumer[data-consumer="comfyui"]').text)
    assert "1 (8.8 GiB)" in comfyui
    await browser.screenshot(tmp_path / "status-two-cards.png")
    assert await browser.errors() == []


@pytest_twisted.async_yield_fixture(name="real_daemon")
async def real_daemon_fixture(tmp_path: Path) -> AsyncIterator[Daemon]:
    """``twistd -n mgpumanager --simulate`` on a copy of the demo configuration."""
    daemon = Daemon(demo_config_on_free_ports(), tmp_path, ("--simulate",))
    daemon.start()
    yield daemon
    daemon.stop()


async def live_status(daemon: Daemon) -> dict[str, Any]:
    document: dict[str, Any] = await (await treq.get(daemon.url + "/v1/status")).json()
    return document


@pytest_twisted.ensureDeferred
async def test_the_real_daemon_page_shows_every_consumer_and_the_card(
    browser: Browser, real_daemon: Daemon, tmp_path: Path
) -> None:
    await open_live(browser, real_daemon.url + "/")
    status = await live_status(real_daemon)
    names = await browser.script(
        "return [...document.querySelectorAll('.consumer')].map(e => e.dataset.consumer)"
    )
    assert sorted(names) == sorted(c["name"] for c in status["consumers"])
    await browser.wait_until(
        lambda d: text_of(d, "card-total") == "16.0 GiB", 2.0, "the card's size")
    card = await browser.call(lambda d: text_of(d, "card"))
    assert "free" in card
    assert await browser.errors() == []
    await browser.screenshot(tmp_path / "status-real-daemon.png")


@pytest_twisted.ensureDeferred
async def test_a_job_and_its_eviction_show_within_two_seconds_without_a_reload(
    browser: Browser, real_daemon: Daemon, tmp_path: Path
) -> None:
    await open_live(browser, real_daemon.url + "/")
    await browser.script("window.notReloaded = true")
    # Ollama warm, as usual; then ComfyUI no longer fits beside mvoice and whisper.
    for kind, body in (("llm", b'{"prompt": "hi", "num_lines": 1}'),
                       ("image", b'{"prompt": {"seed": 1}}')):
        answer = await treq.post(real_daemon.url + f"/v1/{kind}", data=body)
        assert answer.code == 200, await answer.text()
        await answer.content()
    shown_by = time.monotonic() + 2.0
    decisions = (await live_status(real_daemon))["scheduler"]["decisions"]
    victims = {d["victim"] for d in decisions if d["victim"]}
    assert victims, "the image job was expected to evict"
    text = await browser.wait_until(
        lambda d: all(f"{v} → comfyui" in text_of(d, "decisions") for v in victims)
        and text_of(d, "decisions"), 2.0, "the eviction appears")
    assert time.monotonic() <= shown_by + 0.5
    assert "unloaded" in text
    script = (
        "return [...document.querySelectorAll('.seg[data-consumer]')].map(e => e.dataset.consumer)"
    )
    await browser.wait_until(
        lambda d: not victims & set(d.execute_script(script)), 2.0, "the victims off the bar"
    )
    # ComfyUI answers its prompt at once and loads its model lazily, as the
    # prompt starts: once the card shows its memory, the page shows it within 2 s.
    for _ in range(200):
        comfy = next(c for c in (await live_status(real_daemon))["consumers"]
                     if c["name"] == "comfyui")
        if comfy["loaded"] and comfy["gpu_resident_mib"] >= comfy["vram_budget_mib"] // 2:
            break
        await sleep(0.05)
    else:
        raise AssertionError(f"ComfyUI never loaded its model: {comfy}")
    residents = await browser.wait_until(
        lambda d: (lambda r: r if "comfyui" in r else None)(d.execute_script(script)),
        2.0,
        "ComfyUI on the card's bar",
    )
    assert "comfyui" in residents
    assert await browser.script("return window.notReloaded") is True
    assert await browser.errors() == []
    await browser.screenshot(tmp_path / "status-after-eviction.png")


@pytest_twisted.ensureDeferred
async def test_keeps_working_when_the_daemon_restarts_on_the_same_port(
    browser: Browser, real_daemon: Daemon
) -> None:
    await open_live(browser, real_daemon.url + "/")
    assert await browser.errors() == []  # before the restart: afterwards some are expected
    await browser.script("window.notReloaded = true")
    real_daemon.stop()
    await browser.wait_until(lambda d: state_of(d) != "live", 3.0, "the page notices")
    real_daemon.start()
    await browser.wait_until(lambda d: state_of(d) == "live", 5.0, "live again")
    answer = await treq.post(real_daemon.url + "/v1/tts", data=b'{"text": "back"}')
    assert answer.code == 200
    await answer.content()
    await browser.wait_until(
        lambda d: "1 total" in (d.find_element("css selector", '.consumer[data-consumer="mvoice"]')
                                .text), 2.0, "the restarted daemon's news")
    assert await browser.script("return window.notReloaded") is True


@pytest_twisted.ensureDeferred
async def test_the_real_two_card_daemon_page_shows_both_cards(
    browser: Browser, tmp_path: Path
) -> None:
    daemon = Daemon(demo_config_on_free_ports("demo-2cards.yaml"), tmp_path, ("--simulate",))
    daemon.start()
    try:
        await open_live(browser, daemon.url + "/")
        totals = await browser.wait_until(lambda d: (lambda t: t if len(t) == 2 else None)(
            d.execute_script(
                "return [...document.querySelectorAll('.card-total')].map(e => e.textContent)")),
            2.0, "both cards")
        assert totals == ["24.0 GiB", "24.0 GiB"]
        answer = await treq.post(daemon.url + "/v1/image", data=b'{"prompt": {"seed": 1}}')
        assert answer.code == 200, await answer.text()
        await answer.content()
        # ComfyUI loads its model as its prompt starts: on card 1's bar, never on card 0's.
        bars = await browser.wait_until(
            lambda d: (lambda b: b if "comfyui" in b.get("1", []) else None)(
                d.execute_script(BARS)), 5.0, "ComfyUI on card 1's bar")
        assert "comfyui" not in bars["0"]
        assert await browser.errors() == []
        await browser.screenshot(tmp_path / "status-real-two-cards.png")
    finally:
        daemon.stop()


@pytest_twisted.ensureDeferred
async def test_the_page_shows_a_yielded_card_and_its_guests(
    browser: Browser, tmp_path: Path
) -> None:
    config = demo_config_on_free_ports("demo.yaml")
    config["gpu"] = {**config.get("gpu", {}), "poll_interval_seconds": 0.5}
    control = f"127.0.0.1:{free_port()}"
    daemon = Daemon(config, tmp_path, ("--simulate", "--simulate-control", control))
    daemon.start()
    try:
        await open_live(browser, daemon.url + "/")
        for _ in range(100):  # the control API opens once the simulated servers are up
            try:
                await treq.get(f"http://{control}/card")
                break
            except ConnectionRefusedError:
                await sleep(0.1)
        guest = await treq.post(f"http://{control}/guests",
                                json={"mib": 3000, "name": "a game"})
        assert guest.code == 201, await guest.text()
        pid = (await guest.json())["pid"]
        shown = await browser.wait_until(
            lambda d: (lambda e: e[0].text if e else None)(
                d.find_elements("css selector", ".guests-list")), 5.0, "the guest")
        assert f"a game (pid {pid}" in shown
        held = await treq.post(daemon.url + "/v1/gpus/0/yield", json={"reason": "a game"})
        assert held.code == 200, await held.text()
        banner = await browser.wait_until(
            lambda d: (lambda e: e[0].text if e else None)(
                d.find_elements("css selector", ".yielded")), 5.0, "the yielded card")
        assert "Yielded to guests (a game)" in banner and "until resumed" in banner
        assert await browser.errors() == []
        await browser.screenshot(tmp_path / "status-yielded.png")
    finally:
        daemon.stop()
