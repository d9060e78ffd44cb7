"""
What ships for operators: the Grafana dashboard and the Prometheus snippet
must name only the metric families the daemon exports, the systemd unit must
reload with SIGHUP, and the wheel must carry the status page.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import yaml

from mgpumanager.web.page import status_page

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
FAMILIES = {
    "mgpumanager_jobs_total", "mgpumanager_queue_depth", "mgpumanager_jobs_running",
    "mgpumanager_queue_wait_seconds", "mgpumanager_job_duration_seconds",
    "mgpumanager_load_duration_seconds", "mgpumanager_unload_duration_seconds",
    "mgpumanager_evictions_total", "mgpumanager_consumer_up", "mgpumanager_consumer_resident",
    "mgpumanager_consumer_vram_bytes", "mgpumanager_gpu_memory_total_bytes",
    "mgpumanager_gpu_memory_used_bytes", "mgpumanager_gpu_memory_free_bytes",
    "mgpumanager_gpu_guest_bytes", "mgpumanager_card_yielded",
}
HISTOGRAMS = {
    "mgpumanager_queue_wait_seconds", "mgpumanager_job_duration_seconds",
    "mgpumanager_load_duration_seconds", "mgpumanager_unload_duration_seconds",
}


def family(series: str) -> str:
    """A histogram's series (``_bucket``, ``_sum``, ``_count``) belong to its family."""
    base = re.sub(r"_(bucket|sum|count)$", "", series)
    return base if base in HISTOGRAMS else series


def test_every_dashboard_query_names_only_exported_families() -> None:
    dashboard = json.loads((DEPLOY / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    named = {family(s) for expr in exprs for s in re.findall(r"\bmgpumanager_\w+", expr)}
    assert named <= FAMILIES, named - FAMILIES
    assert named == FAMILIES, f"no panel shows {FAMILIES - named}"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_prometheus_scrapes_every_host_and_loads_the_alerts() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    (targets,) = (static["targets"] for static in job["static_configs"])
    assert len(targets) == len(set(targets)) >= 2
    assert config["rule_files"] == ["alerts.yml"]


def test_every_alert_names_only_exported_families() -> None:
    rules = yaml.safe_load((DEPLOY / "alerts.yml").read_text())
    exprs = [rule["expr"] for group in rules["groups"] for rule in group["rules"]]
    named = {family(s) for expr in exprs for s in re.findall(r"\bmgpumanager_\w+", expr)}
    assert named <= FAMILIES, named - FAMILIES


def test_the_unit_reloads_with_sighup_and_keeps_no_new_privileges() -> None:
    settings = [
        line.split("=", 1) for line in (DEPLOY / "mgpumanager.service").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    ]
    assert ["ExecReload", "/bin/kill -HUP $MAINPID"] in settings
    assert ["NoNewPrivileges", "yes"] in settings


def test_the_wheel_carries_the_status_page(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        assert archive.read("mgpumanager/web/page/status.html") == status_page()
        entry_points = archive.read(
            next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
        ).decode()
    assert "mgpumanager = mgpumanager.app.cli:main" in entry_points
