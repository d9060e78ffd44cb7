"""
Guests on the simulated host through its control API, over loopback: a guest
shows in NVML's process list and memory on its card from the next read (the
state file another process reads, and the cards themselves), with its name;
its end gives the memory back; a guest that does not fit is refused like a CUDA
allocation and is not counted as a server's out-of-memory; a server's load that
no longer fits because of a guest is.  Also the address option and the guests'
process ids, which must never be taken for a server's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
import treq
from twisted.internet.error import ConnectionRefusedError as Refused

from mgpumanager.simulate.__main__ import host_config, parse_args
from mgpumanager.simulate.card import CudaOutOfMemory, SimulatedCard
from mgpumanager.simulate.cards import CardBank
from mgpumanager.simulate.control import control_address
from mgpumanager.simulate.guests import GUEST_PID_BASE, GuestBook
from mgpumanager.simulate.host import PIDS, HostConfig, SimulatedHost, consumer_pids
from mgpumanager.simulate.nvml import SimulatedNvml
from mgpumanager.simulate.ollama_models import DEFAULT_EMBED_MODEL, runner_owner
from mgpumanager.state.gpu import MIB


@pytest_twisted.async_yield_fixture(name="host")
async def host_fixture(tmp_path: Path) -> AsyncIterator[SimulatedHost]:
    config = HostConfig.fast(
        total_mib=16384, cards_mib=(16384, 16384), state_path=str(tmp_path / "cards.json"),
        audio_dir=str(tmp_path / "audio"), control=("127.0.0.1", 0),
    )
    host = SimulatedHost(config)
    await host.start()
    yield host
    await host.stop()


def url(host: SimulatedHost, path: str) -> str:
    assert host.control_url is not None
    return host.control_url + path


async def answer(response: Any) -> tuple[int, Any]:
    assert response.headers.getRawHeaders(b"content-type") == [b"application/json"]
    return response.code, await response.json()


def processes(nvml: SimulatedNvml, card: int) -> dict[int, int]:
    handle = nvml.nvmlDeviceGetHandleByIndex(card)
    return {p.pid: p.usedGpuMemory for p in nvml.nvmlDeviceGetComputeRunningProcesses(handle)}


def used(nvml: SimulatedNvml, card: int) -> int:
    return int(nvml.nvmlDeviceGetMemoryInfo(nvml.nvmlDeviceGetHandleByIndex(card)).used)


@pytest_twisted.ensureDeferred
async def test_a_guest_shows_in_nvml_on_its_card_and_its_end_frees_the_memory(
    host: SimulatedHost,
) -> None:
    from_file = SimulatedNvml(str(host.config.state_path))
    in_process = SimulatedNvml(host.cards)
    for nvml in (from_file, in_process):
        nvml.nvmlInit()
    before = [used(from_file, 0), used(from_file, 1)]

    code, guest = await answer(
        await treq.post(url(host, "/guests"), json={"card": 1, "mib": 10240, "name": "game"})
    )
    assert code == 201
    pid = guest["pid"]
    assert guest == {"pid": pid, "card": 1, "mib": 10240, "name": "game"}
    for nvml in (from_file, in_process):
        assert processes(nvml, 1)[pid] == 10240 * MIB
        assert pid not in processes(nvml, 0)
        assert [used(nvml, 0), used(nvml, 1)] == [before[0], before[1] + 10240 * MIB]
        assert nvml.nvmlSystemGetProcessName(pid) == "game"

    code, cards = await answer(await treq.get(url(host, "/card")))
    assert code == 200
    card1 = cards["cards"][1]
    assert {"pid": pid, "name": "game", "mib": 10240, "kind": "guest"} in card1["holders"]
    assert card1["free_mib"] == 16384 - before[1] // MIB - 10240
    assert all(h["kind"] == "consumer" for h in cards["cards"][0]["holders"])
    assert {h["name"] for h in cards["cards"][0]["holders"]} >= {"mvoice", "whisper"}

    code, ended = await answer(await treq.delete(url(host, f"/guests/{pid}")))
    assert (code, ended) == (200, guest)
    for nvml in (from_file, in_process):
        assert pid not in processes(nvml, 1)
        assert [used(nvml, 0), used(nvml, 1)] == before
    code, error = await answer(await treq.delete(url(host, f"/guests/{pid}")))
    assert (code, error["error"]) == (404, "not_found")


@pytest_twisted.ensureDeferred
async def test_a_guest_makes_a_later_load_run_out_of_memory_on_its_card(
    host: SimulatedHost,
) -> None:
    code, _ = await answer(
        await treq.post(url(host, "/guests"), json={"card": 1, "mib": 10000, "name": "train"})
    )
    assert code == 201
    with pytest.raises(CudaOutOfMemory):
        await host.comfy.model.load()  # 9000 MiB on card 1, 6384 free
    code, cards = await answer(await treq.get(url(host, "/card")))
    assert [card["oom_count"] for card in cards["cards"]] == [0, 1]
    assert cards["oom_count"] == host.oom_count == 1


@pytest_twisted.ensureDeferred
async def test_a_guest_that_does_not_fit_is_refused_and_holds_nothing(
    host: SimulatedHost,
) -> None:
    free = host.cards[0].free_mib
    code, error = await answer(
        await treq.post(url(host, "/guests"), json={"mib": free + 1, "name": "big"})
    )
    assert (code, error["error"]) == (409, "out_of_memory")
    assert f"Tried to allocate {free + 1} MiB (GPU 0;" in error["message"]
    assert f"{free} MiB free" in error["message"]
    assert host.cards[0].free_mib == free
    code, cards = await answer(await treq.get(url(host, "/card")))
    assert cards["cards"][0]["guest_refusals"] == 1
    assert cards["oom_count"] == 0
    # Exactly what is free still fits: the card is full, not over.
    code, guest = await answer(await treq.post(url(host, "/guests"), json={"mib": free}))
    assert (code, guest["name"], host.cards[0].free_mib) == (201, "guest", 0)


@pytest.mark.parametrize(
    ("body", "status", "code", "says"),
    [
        (b"not json", 400, "bad_request", "not JSON"),
        (b"[1, 2]", 400, "bad_request", "JSON object"),
        (b'{"card": 0}', 400, "bad_request", "mib is required"),
        (b'{"mib": 0}', 400, "bad_request", "positive integer"),
        (b'{"mib": 1.5}', 400, "bad_request", "positive integer"),
        (b'{"mib": true}', 400, "bad_request", "positive integer"),
        (b'{"mib": 10, "card": -1}', 400, "bad_request", "card index"),
        (b'{"mib": 10, "card": "1"}', 400, "bad_request", "card index"),
        (b'{"mib": 10, "name": ""}', 400, "bad_request", "name must be"),
        (b'{"mib": 10, "name": "a\\nb"}', 400, "bad_request", "name must be"),
        (b'{"mib": 10, "mb": 10}', 400, "bad_request", "unknown field(s) mb"),
        (b'{"mib": 10, "card": 2}', 404, "not_found", "no card 2 (the host has 2)"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_guest_is_refused_with_a_json_error(
    host: SimulatedHost, body: bytes, status: int, code: str, says: str
) -> None:
    used_before = [card.used_mib for card in host.cards]
    got, error = await answer(await treq.post(url(host, "/guests"), data=body))
    assert (got, error["error"]) == (status, code)
    assert says in error["message"]
    assert [card.used_mib for card in host.cards] == used_before
    assert not host.guests.by_owner()


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("DELETE", "/guests/4101", 404, "not_found"),  # a server is no guest
        ("DELETE", "/guests/x", 404, "not_found"),
        ("GET", "/nothing", 404, "not_found"),
        ("PUT", "/card", 405, "method_not_allowed"),
        ("GET", "/guests", 405, "method_not_allowed"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_unknown_guests_routes_and_methods_answer_json(
    host: SimulatedHost, method: str, path: str, status: int, code: str
) -> None:
    got, error = await answer(await treq.request(method, url(host, path)))
    assert (got, error["error"]) == (status, code)
    assert host.cards[0].held_by("mvoice") == 3000


@pytest_twisted.ensureDeferred
async def test_the_control_api_is_closed_unless_asked_for(tmp_path: Path) -> None:
    host = SimulatedHost(HostConfig.fast(audio_dir=str(tmp_path)))
    await host.start()
    try:
        assert host.control_url is None
        assert set(host.urls()) == set(PIDS)
    finally:
        await host.stop()


@pytest_twisted.ensureDeferred
async def test_stopping_the_host_ends_its_guests_and_closes_the_control_api(
    host: SimulatedHost,
) -> None:
    await treq.post(url(host, "/guests"), json={"mib": 1000})
    control = url(host, "/card")
    await host.stop()
    assert host.control_url is None
    assert all(card.used_mib == 0 for card in host.cards)
    with pytest.raises(Refused):
        await treq.get(control)


def test_guest_pids_never_collide_with_the_servers() -> None:
    bank = CardBank([8000, 8000])
    for owner, pid in PIDS.items():
        bank.register(owner, pid)
    guests = GuestBook(bank.cards, bank.pids)
    first = guests.arrive(0, 100, "game")
    second = guests.arrive(1, 100, "game")
    guests.leave(first.pid)
    third = guests.arrive(0, 100, "game")
    assert [first.pid, second.pid, third.pid] == [
        GUEST_PID_BASE, GUEST_PID_BASE + 1, GUEST_PID_BASE + 2
    ]
    # A reader in another process derives the servers' ids without knowing of
    # guests: guests that came first must not move them.
    runner = runner_owner("ollama", DEFAULT_EMBED_MODEL, first=False)
    bank.cards[0].allocate(runner, 1)
    assert consumer_pids()["ollama"] == {PIDS["ollama"], bank.pids.pid_of(runner)}
    assert max(max(pids) for pids in consumer_pids().values()) < GUEST_PID_BASE


def test_a_refused_guest_does_not_count_as_a_servers_out_of_memory() -> None:
    card = SimulatedCard(1000)
    guests = GuestBook([card], CardBank([1]).pids)
    with pytest.raises(CudaOutOfMemory):
        guests.arrive(0, 1001, "big")
    assert (card.oom_count, guests.refusals, card.used_mib) == (0, [1], 0)
    with pytest.raises(CudaOutOfMemory):
        card.allocate("server", 1001)
    assert card.oom_count == 1


def test_the_card_file_keeps_its_shape_for_the_servers(tmp_path: Path) -> None:
    card = SimulatedCard(1000, state_path=str(tmp_path / "card.json"))
    card.register("mvoice", 4101)
    card.allocate("mvoice", 10)
    (process,) = card.snapshot().to_json()["processes"]
    assert process == {"pid": 4101, "owner": "mvoice", "used_mib": 10}


@pytest.mark.parametrize(
    ("text", "address"),
    [("127.0.0.1:0", ("127.0.0.1", 0)), ("localhost:8779", ("127.0.0.1", 8779)),
     ("127.0.0.2:1", ("127.0.0.2", 1))],
)
def test_the_control_address_is_loopback(text: str, address: tuple[str, int]) -> None:
    assert control_address(text) == address


@pytest.mark.parametrize(
    "text", ["0.0.0.0:8779", "192.168.1.2:8779", "[::1]:8779", "8779", "127.0.0.1:x",
             "127.0.0.1:70000", "example.org:80"],
)
def test_a_control_address_off_loopback_or_malformed_is_refused(text: str) -> None:
    with pytest.raises(ValueError):
        control_address(text)


def test_control_on_the_command_line(tmp_path: Path) -> None:
    card_file = str(tmp_path / "c.json")
    options = parse_args(["--control", "127.0.0.1:0", "--card-file", card_file])
    assert host_config(options).control == ("127.0.0.1", 0)
    assert host_config(parse_args(["--card-file", card_file])).control is None
    with pytest.raises(SystemExit):
        parse_args(["--control", "0.0.0.0:8779"])
