"""
The ``mgpumanager`` command: check a configuration before a restart or reload,
and read a running daemon's status and plans from a terminal.  It runs
outside the reactor, so a plain blocking HTTP client is the honest choice.

Exit status: 0 success, 1 the daemon could not be reached or answered an
error, 2 a bad configuration or a usage error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from mgpumanager.app.cli_daemon import DEFAULT_URL, DaemonError, get_json, read_token
from mgpumanager.app.cli_yield import add_commands
from mgpumanager.app.describe import describe, render_consumers
from mgpumanager.config.document import Config, ConfigError
from mgpumanager.consumers.adapters import load_resolved_config


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """
    Run one command; returns the exit status.

    :param out: where answers go (standard output by default); errors always
        go to standard error, so a script can tell them apart.
    """
    out = out or sys.stdout
    args = _parser().parse_args(argv)
    if args.command == "check":
        return _check(args.config, out)
    if getattr(args, "run", None) is not None:
        return int(args.run(args, out))
    try:
        document = get_json(args.url, _path(args), read_token(args.token_file))
    except DaemonError as e:
        print(f"mgpumanager: {e}", file=sys.stderr)
        return 1
    print(render_status(document) if args.command == "status" else render_plan(document), file=out)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mgpumanager", description="Check a configuration or ask a running daemon."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    check = commands.add_parser("check", help="validate a configuration file and summarise it")
    check.add_argument("config", metavar="CONFIG")
    for name, helptext in (("status", "the daemon's live state"), ("plan", "a dry run")):
        command = commands.add_parser(name, help=helptext)
        if name == "plan":
            command.add_argument("kind", metavar="KIND", help="tts, stt, llm or image")
        command.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
        command.add_argument("--token-file", help="a file holding the daemon's bearer token")
    add_commands(commands)
    return parser


def _check(path: str, out: TextIO) -> int:
    try:
        # What the daemon runs on: the file, then each adapter's defaults.
        config = load_resolved_config(path)
    except ConfigError as e:
        print(f"mgpumanager: {e}", file=sys.stderr)
        return 2
    print(render_config(config), file=out)
    return 0


def _path(args: argparse.Namespace) -> str:
    return "/v1/status" if args.command == "status" else f"/v1/plan/{args.kind}"


def table(rows: Sequence[Sequence[object]]) -> str:
    """Rows as left-aligned columns, the first row a header."""
    cells = [["" if c is None else str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    )


def _mib(value: object) -> str:
    return f"{value} MiB" if isinstance(value, int) else "-"


def render_config(config: Config) -> str:
    """
    What ``check`` prints: the file is valid, and what the daemon will do
    with each consumer (:mod:`mgpumanager.app.describe`).
    """
    routing = ", ".join(f"{kind} -> {name}" for kind, name in config.routing.items())
    return (
        f"{config.source}: ok\nlisten: {config.listen}\nrouting: {routing or 'none'}\n\n"
        f"{render_consumers(describe(config))}"
    )


def render_status(status: dict[str, Any]) -> str:
    """
    What ``status`` prints: a line per card, the consumers, the running jobs
    and the queue.  On a host with several cards the consumers, jobs and
    waiting jobs also say their cards.
    """
    cards = status.get("gpus")
    if not isinstance(cards, list) or not cards:
        cards = None  # a daemon from before several cards: its one card is gpu
    several = cards is not None and len(cards) > 1
    lines = _card_lines(cards) if cards is not None else _card_lines(
        [status.get("gpu") or {}], numbered=False)
    unmanaged = status.get("unmanaged_cards")
    if unmanaged:
        lines.append(f"  and {unmanaged} card{'s' if unmanaged != 1 else ''} not managed")
    header: tuple[object, ...] = (
        "consumer", "health", "residency", "vram", "loads", "unloads", "jobs", "last error")
    rows: list[Sequence[object]] = [(*header[:4], "cards", *header[4:]) if several else header]
    for c in status.get("consumers") or []:
        health = {True: "healthy", False: "unhealthy"}.get(c.get("healthy"), "unknown")
        measured = c.get("gpu_resident_mib")
        vram = f"{measured} MiB" if measured else f"{_mib(c.get('vram_budget_mib'))} declared"
        row: tuple[object, ...] = (
            c.get("name"), health, "resident" if c.get("loaded") else "unloaded", vram,
            c.get("loads", 0), c.get("unloads", 0), c.get("total_requests", 0),
            c.get("last_error") or "",
        )
        rows.append((*row[:4], _cards(c.get("gpus")), *row[4:]) if several else row)
    lines += ["", table(rows), ""]
    lines += _scheduler_lines(status.get("scheduler") or {}, several)
    return "\n".join(lines)


def _card_lines(cards: list[dict[str, Any]], numbered: bool = True) -> list[str]:
    """One line per card: its memory, then what holds it; its NVML error below it."""
    lines = []
    for card in cards:
        number = f" {card.get('index')}" if numbered else ""
        line = (
            f"card{number}: {card.get('name') or 'GPU'}  total {_mib(card.get('total_mib'))}  "
            f"used {_mib(card.get('used_mib'))}  free {_mib(card.get('free_mib'))}  "
            f"reserved {_mib(card.get('reserved_mib'))}"
        )
        if card.get("guest_mib"):
            line += f"  guests {_mib(card['guest_mib'])}"
        if card.get("running") is not None:
            line += f"  running job {card['running']}"
        yielded = card.get("yielded")
        if isinstance(yielded, dict):
            line += f"  yielded ({yielded.get('reason') or 'asked'})"
        lines.append(line)
        if card.get("err"):
            lines.append(f"  no NVML reading: {card['err']}")
    return lines


def _cards(cards: object) -> str:
    return ",".join(map(str, cards)) if isinstance(cards, list) else ""


def _scheduler_lines(scheduler: dict[str, Any], several: bool = False) -> list[str]:
    running_jobs = scheduler.get("running_jobs")
    running = scheduler.get("running")
    if not isinstance(running_jobs, list):
        running_jobs = [running] if running else []
    lines = [
        f"running: {job.get('consumer')} {job.get('kind')} "
        f"({job.get('phase', 'running')}, since {job.get('started')})"
        + (f" on card {_cards(job.get('cards'))}" if several else "")
        for job in running_jobs
    ] or [f"running: {scheduler.get('in_flight', 0) or 'nothing'}"]
    queue = scheduler.get("queue")
    if not isinstance(queue, list):
        return [*lines, f"queue: {scheduler.get('queue_depth', 0)} waiting"]
    if not queue:
        return [*lines, "queue: empty"]
    header = ("#", "consumer", "kind", "class", "waited", "eta")
    rows: list[Sequence[object]] = [(*header, "cards") if several else header]
    for n, job in enumerate(queue, 1):
        eta = job.get("eta_seconds")
        row = (
            n, job.get("consumer"), job.get("kind"), job.get("class"),
            f"{job.get('waited_ms', 0)} ms", "unknown" if eta is None else f"{eta} s",
        )
        rows.append((*row, _cards(job.get("cards"))) if several else row)
    return [*lines, f"queue: {len(queue)} waiting", table(rows)]


def render_plan(plan: dict[str, Any]) -> str:
    """What ``plan`` prints: what a job of that kind would evict and load, and why."""
    lines = [f"{plan.get('kind')}: served by {plan.get('target')}"]
    if plan.get("skip_make_room"):
        lines.append(f"no room to make: {plan['skip_make_room']}")
    for n, step in enumerate(plan.get("steps") or [], 1):
        fit = step.get("fit") or {}
        victim = step.get("victim") or "nobody"
        verdict = "fits" if fit.get("fits") else f"does not fit; evict {victim}"
        on = f" (card {step['card']})" if step.get("card") is not None else ""
        lines.append(f"step {n}{on}: {fit.get('why')} -> {verdict}")
        for candidate in step.get("candidates") or []:
            lines.append(f"    {candidate.get('name')}: {candidate.get('reason')}")
    evict = plan.get("would_evict") or []
    lines.append(f"would evict: {', '.join(evict) if evict else 'nothing'}")
    if plan.get("would_load"):
        load_by = plan.get("load_by") or "on its first request"
        lines.append(f"would load: {plan.get('target')} ({load_by})")
    else:
        lines.append("would load: nothing (already resident)")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
