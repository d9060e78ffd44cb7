"""
The shipped ``deploy/prometheus.yml`` and ``deploy/alerts.yml`` read by the real
programs: ``promtool`` checks the configuration and the rules and runs the
alerts' cases; a real Prometheus, with the file's targets moved to two daemons
on loopback (and a one-second scrape), scrapes both after known jobs and
answers ``sum(mgpumanager_jobs_total)`` with their number, its alerts loaded.
"""

from __future__ import annotations

import json
import re
import subprocess
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.daemon import REPO, free_port
from tests.hosts import Host, Program, missing_line, post, program, start_hosts, stop_hosts

DEPLOY = REPO / "deploy"
MISSING = missing_line("prometheus", "promtool")
if MISSING is not None:
    pytest.skip(MISSING, allow_module_level=True)


def promtool(*args: str) -> str:
    result = subprocess.run(
        [program("promtool") or "promtool", *args], cwd=DEPLOY, capture_output=True, text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout + result.stderr


def test_promtool_passes_the_config_the_rules_and_their_cases() -> None:
    assert "SUCCESS" in promtool("check", "config", "prometheus.yml")
    assert "SUCCESS: 5 rules found" in promtool("check", "rules", "alerts.yml")
    assert "SUCCESS" in promtool("test", "rules", "alerts.test.yml")


def loopback_config(text: str, hosts: list[Host]) -> str:
    """The shipped file with its targets replaced by the daemons, scraped every second."""
    targets = ", ".join(f'"127.0.0.1:{host.daemon.port}"' for host in hosts)
    text, moved = re.subn(r"(?m)^(\s*- targets: )\[.*\]$", rf"\g<1>[{targets}]", text)
    text, faster = re.subn(r"(?m)^(\s*(scrape|evaluation)_interval: )15s$", r"\g<1>1s", text)
    assert (moved, faster) == (1, 2), "the shipped file changed shape"
    return text


def api(base: str, path: str, **query: str) -> Any:
    """One Prometheus API call's ``data`` (blocking: run it in a thread)."""
    url = f"{base}/api/v1/{path}?{urllib.parse.urlencode(query)}"
    with urllib.request.urlopen(url, timeout=5) as answer:
        document = json.loads(answer.read())
    assert document["status"] == "success", document
    return document["data"]


@pytest_twisted.async_yield_fixture
async def hosts(tmp_path: Path) -> AsyncIterator[list[Host]]:
    started = await start_hosts(tmp_path, ("a", "b"))
    try:
        yield started
    finally:
        await stop_hosts(started)


@pytest_twisted.ensureDeferred
async def test_prometheus_scrapes_both_hosts_and_sums_their_jobs(
    hosts: list[Host], tmp_path: Path
) -> None:
    a, b = hosts
    jobs = [(a, "llm", {"prompt": "hi", "num_lines": 2}), (a, "llm", {"prompt": "again"}),
            (a, "tts", {"text": "hello"}), (b, "tts", {"text": "hello"}),
            (b, "llm", {"prompt": "hi", "num_lines": 2})]
    for n, (host, kind, body) in enumerate(jobs):
        code, answer = await post(f"{host.url}/v1/{kind}", body, f"job-{n}")
        assert code == 200, answer[:200]

    config = tmp_path / "prometheus" / "prometheus.yml"
    config.parent.mkdir()
    config.write_text(loopback_config((DEPLOY / "prometheus.yml").read_text(), hosts))
    (config.parent / "alerts.yml").write_text((DEPLOY / "alerts.yml").read_text())
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    prometheus = Program([
        program("prometheus") or "prometheus", f"--config.file={config}",
        f"--storage.tsdb.path={tmp_path / 'prometheus' / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ], tmp_path / "prometheus.log")
    try:
        await deferToThread(prometheus.answers, base + "/-/ready", 30)
        total: list[Any] = []
        for _ in range(150):
            total = (await deferToThread(
                api, base, "query", query="sum(mgpumanager_jobs_total)"))["result"]
            targets = await deferToThread(api, base, "targets")
            up = [t["health"] for t in targets["activeTargets"]]
            if total and float(total[0]["value"][1]) == len(jobs) and up == ["up", "up"]:
                break
            await deferLater(reactor, 0.2, lambda: None)
        assert total and float(total[0]["value"][1]) == len(jobs), (total, prometheus.log())
        assert up == ["up", "up"]
        by_host = await deferToThread(
            api, base, "query", query="sum by (instance) (mgpumanager_jobs_total)")
        assert {r["metric"]["instance"]: float(r["value"][1]) for r in by_host["result"]} == {
            f"127.0.0.1:{a.daemon.port}": 3.0, f"127.0.0.1:{b.daemon.port}": 2.0}
        rules = await deferToThread(api, base, "rules")
        names = {rule["name"] for group in rules["groups"] for rule in group["rules"]}
        assert {"MgpumanagerQueueStuck", "MgpumanagerUnloadFailed",
                "MgpumanagerConsumerDown", "MgpumanagerCardYieldedLong"} <= names
    finally:
        prometheus.stop()
