"""
The soak (``bench/soak.py``) in short: 240 jobs of every kind at concurrency 16
through a real daemon in front of the simulated host in its own process, two
CPU hogs running, 10 % of the clients hanging up mid-answer, the host killed
with SIGKILL and started again, a SIGHUP reload every 4 s and ten event
readers; then every job accounted for, none closed without an answer, no POST
twice at the servers, no out-of-memory, RSS flat, the readers at the final state.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.daemon import Daemon

# bench/ holds scripts that import their neighbours, not a package.
BENCH = Path(__file__).resolve().parents[2] / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from soak import Options, listen_backlog, soak  # noqa: E402


@pytest_twisted.ensureDeferred
async def test_a_short_soak_passes_every_check(tmp_path: Path) -> None:
    options = Options(jobs=240, concurrency=16, disconnect_share=0.1, readers=10,
                      reload_every=4, hogs=2, seed=7, time_limit=40, workdir=tmp_path)
    figures = await soak(reactor, options)
    print(figures.table())
    assert figures.ok, figures.table()
    assert not figures.error
    # The run did what it says: every kind sent, some hung up, the kill and reloads happened.
    assert sorted(figures.by_kind) == ["image", "llm", "speech", "stt", "tts", "whisper"]
    assert figures.outcomes["closed"] == 0
    assert 5 <= figures.outcomes["cancelled"] <= 50
    assert figures.outcomes["relayed"] >= 100
    assert figures.host_kill.startswith("killed")
    assert figures.reloads_sent >= 1 and figures.reloads_done == figures.reloads_sent
    assert figures.posts_twice == 0 and figures.posts_at_servers > 0
    assert figures.oom_count == 0
    assert figures.readers_at_final_state == 10


@pytest_twisted.ensureDeferred
async def test_the_listen_backlog_holds_a_burst_of_200_clients(tmp_path: Path) -> None:
    config = {"consumers": {"voice": {"url": "http://127.0.0.1:9", "health": {"path": "/h"},
                                      "paths": {"tts": {"path": "/tts"}}}}}
    daemon = Daemon(config, tmp_path)
    try:
        await deferToThread(daemon.start)
        backlog = await deferToThread(listen_backlog, daemon.port)
    finally:
        if daemon.process is not None:
            await deferToThread(daemon.stop)
    if backlog is None:
        pytest.skip("`ss` cannot show the listening socket's backlog here")
    assert backlog >= 200
