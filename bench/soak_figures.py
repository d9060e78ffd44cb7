"""The soak's figures, the checks made on them, and the printed table."""

from __future__ import annotations

from collections import Counter
from typing import Any

import attrs

#: Daemon RSS growth allowed between the warm-up and the end.
RSS_SLACK_KIB = 10 * 1024


@attrs.frozen
class Check:
    name: str
    ok: bool
    detail: str


@attrs.define
class Figures:
    options: Any
    jobs_sent: int = 0
    outcomes: Counter[str] = attrs.Factory(Counter)
    by_kind: dict[str, Counter[str]] = attrs.Factory(dict)
    daemon_errors: Counter[str] = attrs.Factory(Counter)
    relayed_statuses: Counter[int] = attrs.Factory(Counter)
    closed_samples: list[str] = attrs.Factory(list)
    cut_samples: list[str] = attrs.Factory(list)
    cut_outside_kill: int = 0
    out_of_memory_answers: int = 0
    posts_at_servers: int = 0
    posts_twice: int = 0
    oom_count: int = 0
    host_kill: str = ""
    reloads_sent: int = 0
    reloads_done: int | None = None
    readers: int = 0
    reader_events: list[int] = attrs.Factory(list)
    reader_reconnects: int = 0
    readers_at_final_state: int = 0
    final_state: dict[str, Any] = attrs.Factory(dict)
    rss_start_kib: int = 0
    rss_end_kib: int = 0
    hogs: int = 0
    daemon_alive: bool = False
    error: str = ""
    wall_s: float = 0.0
    checks: list[Check] = attrs.Factory(list)

    @property
    def rss_growth_kib(self) -> int:
        return self.rss_end_kib - self.rss_start_kib

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(check.ok for check in self.checks)

    def check(self) -> None:
        o = self.outcomes
        accounted = o["relayed"] + o["daemon"] + o["cancelled"] + o["cut"] + o["closed"]
        final = self.final_state
        self.checks = [
            Check("every job accounted for", accounted == self.jobs_sent == self.options.jobs,
                  f"{accounted} of {self.jobs_sent} sent, {self.options.jobs} planned"),
            Check("no connection closed without an answer", o["closed"] == 0,
                  f"{o['closed']}" + (f" ({'; '.join(self.closed_samples)})"
                                      if self.closed_samples else "")),
            Check("answers cut only by the host's kill", self.cut_outside_kill == 0,
                  f"{o['cut']} cut, {self.cut_outside_kill} away from the kill"),
            Check("no POST delivered twice (counted at the servers)", self.posts_twice == 0,
                  f"{self.posts_twice} of {self.posts_at_servers} ids seen more than once"),
            Check("no out-of-memory on the card",
                  self.oom_count == 0 and self.out_of_memory_answers == 0,
                  f"card {self.oom_count}, answers {self.out_of_memory_answers}"),
            Check("daemon RSS growth under 10 MiB", 0 < self.rss_start_kib
                  and self.rss_growth_kib < RSS_SLACK_KIB,
                  f"{self.rss_growth_kib / 1024:+.1f} MiB"),
            Check("every event reader saw the final state",
                  self.readers_at_final_state == self.readers > 0,
                  f"{self.readers_at_final_state} of {self.readers}"),
            Check("the host was killed and came back", self.host_kill.startswith("killed"),
                  self.host_kill or "-"),
            Check("the daemon took its reloads", bool(self.reloads_sent)
                  and self.reloads_done == self.reloads_sent,
                  f"{self.reloads_done} of {self.reloads_sent} SIGHUPs"),
            Check("the daemon is idle and alive", self.daemon_alive
                  and final.get("queue_depth") == 0 and final.get("in_flight") == 0,
                  f"queue {final.get('queue_depth')}, in flight {final.get('in_flight')}"),
        ]

    def table(self) -> str:
        o = self.options
        kinds = ", ".join(
            f"{kind} {sum(c.values())}" for kind, c in sorted(self.by_kind.items()))
        rows = [
            ("jobs / concurrency / hang-up share / seed",
             f"{o.jobs} / {o.concurrency} / {o.disconnect_share:g} / {o.seed}"),
            ("jobs by kind", kinds),
            ("relayed whole", f"{self.outcomes['relayed']} (statuses " + ", ".join(
                f"{code} x{n}" for code, n in sorted(self.relayed_statuses.items())) + ")"),
            ("daemon's own JSON error", f"{self.outcomes['daemon']} (" + ", ".join(
                f"{code} x{n}" for code, n in self.daemon_errors.most_common()) + ")"),
            ("cancelled by their client", str(self.outcomes["cancelled"])),
            ("cut mid-answer (host killed)", f"{self.outcomes['cut']}"),
            ("closed without an answer", str(self.outcomes["closed"])),
            ("POSTs at the servers / ids twice", f"{self.posts_at_servers} / {self.posts_twice}"),
            ("card out-of-memory / OOM answers",
             f"{self.oom_count} / {self.out_of_memory_answers}"),
            ("host", self.host_kill or "-"),
            ("SIGHUP reloads sent / taken", f"{self.reloads_sent} / {self.reloads_done}"),
            ("event readers / events each (min..max) / reconnects",
             f"{self.readers} / {min(self.reader_events, default=0)}.."
             f"{max(self.reader_events, default=0)} / {self.reader_reconnects}"),
            ("readers at the final state", f"{self.readers_at_final_state}"),
            ("daemon RSS after warm-up / end",
             f"{self.rss_start_kib / 1024:.1f} / {self.rss_end_kib / 1024:.1f} MiB "
             f"({self.rss_growth_kib / 1024:+.1f})"),
            ("CPU hogs", str(self.hogs)),
            ("wall time", f"{self.wall_s:.1f} s"),
        ]
        if self.cut_samples:
            rows.append(("cut, first ones", "; ".join(self.cut_samples)))
        if self.error:
            rows.append(("error", self.error))
        width = max(len(name) for name, _ in rows)
        lines = [f"{name:<{width}}  {value}" for name, value in rows]
        lines += [""] + [f"[{'ok' if c.ok else 'FAIL'}] {c.name}: {c.detail}"
                         for c in self.checks]
        lines += ["", "verdict: " + ("PASS" if self.ok else "FAIL")]
        return "\n".join(lines)
