"""Results over rounds, and the tables the benchmark prints."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    rank = max(1, math.ceil(fraction * len(ordered)))
    return ordered[rank - 1]


@dataclass
class Target:
    """One figure checked against a limit: its median over rounds decides."""

    section: str
    label: str
    key: str
    limit: float
    unit: str
    check: Callable[[float, float], bool]
    limit_text: str


@dataclass
class Results:
    values: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    notes: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    errors: list[str] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def add(self, key: str, value: float) -> None:
        self.values[key].append(value)

    def get(self, key: str) -> list[float]:
        return self.values.get(key, [])

    def median(self, key: str) -> float | None:
        values = self.get(key)
        return statistics.median(values) if values else None

    def cell(self, key: str, digits: int = 2, scale: float = 1.0) -> str:
        """The median and [min..max] of ``key``, each times ``scale`` (ms to us: 1000)."""
        values = [value * scale for value in self.get(key)]
        if not values:
            return "-"
        middle = f"{statistics.median(values):.{digits}f}"
        if len(values) == 1:
            return middle
        return f"{middle} [{min(values):.{digits}f}..{max(values):.{digits}f}]"

    def note(self, section: str, text: str) -> None:
        self.notes[section].append(text)

    def target(self, section: str, label: str, key: str, limit: float, unit: str,
               kind: str = "<=") -> None:
        checks: dict[str, Callable[[float, float], bool]] = {
            "<=": lambda value, bound: value <= bound,
            "<": lambda value, bound: value < bound,
            "|<=|": lambda value, bound: abs(value) <= bound,
        }
        text = {"<=": f"<= {limit:g} {unit}", "<": f"< {limit:g} {unit}",
                "|<=|": f"within +-{limit:g} {unit}"}[kind]
        self.targets.append(Target(section, label, key, limit, unit, checks[kind], text))

    def verdict(self, target: Target) -> tuple[str, str]:
        value = self.median(target.key)
        if value is None:
            return "-", "NOT MEASURED"
        return self.cell(target.key, 3 if abs(value) < 10 else 1), (
            "PASS" if target.check(value, target.limit) else "MISS"
        )


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    """Columns padded to their widest cell; the first ``left`` columns left-aligned."""
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(cell).ljust(width) if index < left else str(cell).rjust(width)
            for index, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    rule = "  ".join("-" * width for width in widths)
    return "\n".join([line(headers), rule, *(line(row) for row in rows)])


def targets_table(results: Results, section: str | None = None) -> str:
    rows = []
    for target in results.targets:
        if section is not None and target.section != section:
            continue
        measured, verdict = results.verdict(target)
        rows.append([target.label, f"{measured} {target.unit}", target.limit_text, verdict])
    if not rows:
        return ""
    return table(["target (median over rounds)", "measured [min..max]", "limit", "result"],
                 rows, left=1)


def heading(title: str) -> str:
    return f"\n{title}\n{'=' * len(title)}"
