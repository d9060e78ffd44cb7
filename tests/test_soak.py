"""
The soak (``bench/soak.py``) in short: 120 jobs at concurrency 40 through a real
daemon, 30 % of the clients walking away at random moments and one consumer
restarted mid-run; then queue and in-flight back to 0, bodies intact, no POST
seen twice, RSS back near its start, and a next job that runs at once.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread

from tests.daemon import Daemon
from tests.upstream import Tracker

# bench/ holds scripts that import their neighbours, not a package.
BENCH = Path(__file__).resolve().parent.parent / "bench"
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

from soak import CONSUMERS, Consumer, Options, daemon_config, listen_backlog, soak  # noqa: E402


@pytest_twisted.ensureDeferred
async def test_a_short_soak_passes_every_check(tmp_path: Path) -> None:
    options = Options(jobs=120, concurrency=40, disconnect_share=0.3, seed=7,
                      time_limit=60, workdir=tmp_path)
    figures = await soak(reactor, options)
    print(figures.table())
    assert figures.ok, figures.table()
    assert [check.name for check in figures.checks if not check.ok] == []
    assert not figures.error and not figures.timed_out
    # The run did what it says: every job sent, some walked away, the restart happened.
    assert figures.jobs_sent == 120
    assert figures.completed + figures.disconnected + figures.failed_by_restart == 120
    assert 20 <= figures.disconnected <= 60
    assert figures.completed >= 50
    assert figures.restart.startswith("llm ")
    # The figures behind the checks.
    assert figures.other_failures == 0
    assert figures.bodies_checked == figures.completed and figures.bodies_broken == 0
    assert figures.consumer_body_mismatches == 0
    assert figures.max_posts_per_id == 1
    assert figures.queue_depth == 0 and figures.in_flight == 0
    assert figures.rss_start_kib > 0
    assert figures.rss_end_kib - figures.rss_start_kib <= 20 * 1024
    assert figures.next_job_status == "200"
    assert figures.next_job_ms is not None and figures.next_job_ms <= 1000
    assert figures.daemon_log_errors == []


@pytest_twisted.ensureDeferred
async def test_the_listen_backlog_holds_a_burst_of_200_clients(tmp_path: Path) -> None:
    tracker = Tracker()
    consumers = {name: Consumer(name, tracker, reactor) for name in CONSUMERS}
    daemon = Daemon(daemon_config(consumers), tmp_path)
    try:
        await deferToThread(daemon.start)
        backlog = await deferToThread(listen_backlog, daemon.port)
    finally:
        if daemon.process is not None:
            await deferToThread(daemon.stop)
        for consumer in consumers.values():
            await consumer.stop()
    if backlog is None:
        pytest.skip("`ss` cannot show the listening socket's backlog here")
    assert backlog >= 200
