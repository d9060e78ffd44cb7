"""
The ``scheduling`` section of the configuration: which policy, its bounds,
and the class of each job kind.  Validated here so the config module only
prefixes the file and section to a problem.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs

INTERACTIVE = "interactive"
BATCH = "batch"
JOB_CLASSES = (INTERACTIVE, BATCH)

INTERACTIVE_FIRST = "interactive-first"
FIFO = "fifo"
POLICIES = (INTERACTIVE_FIRST, FIFO)

DEFAULT_CLASSES: Mapping[str, str] = {
    "tts": INTERACTIVE,
    "stt": INTERACTIVE,
    "llm": INTERACTIVE,
    "image": BATCH,
}

#: The documented defaults, written once: ``from_mapping`` and the replayer read them.
DEFAULT_BATCH_GUARD_SECONDS = 300.0
DEFAULT_SWAP_BOUND_SECONDS = 30.0
DEFAULT_MAX_BYPASS = 8
#: How long batch work that needs a swap waits after an interactive job for
#: more of it: long enough that images gather and run together between bursts
#: of voice and chat instead of swapping in at every short gap (the README's
#: replayer results say why 12 and not 10).  It holds only batch work, so no
#: one waiting on an answer waits on it.
DEFAULT_LINGER_SECONDS = 12.0

_KEYS = ("policy", "batch_guard_seconds", "swap_bound_seconds", "max_bypass",
         "linger_seconds", "classes")


class SchedulingConfigError(ValueError):
    """
    The ``scheduling`` mapping cannot be used.  ``key`` is the path inside it
    (``classes.image``) so the config module can prefix the file and section.
    """

    def __init__(self, key: str, problem: str) -> None:
        self.key = key
        self.problem = problem
        super().__init__(f"{key}: {problem}")


@attrs.frozen
class SchedulingConfig:
    """
    The ``scheduling`` section.  ``classes`` is stored as sorted pairs so the
    value stays hashable; :meth:`class_of` reads it.  A kind it does not name
    (``other``) is interactive: unknown work is someone waiting, not a batch.
    """

    policy: str = INTERACTIVE_FIRST
    batch_guard_seconds: float = DEFAULT_BATCH_GUARD_SECONDS
    swap_bound_seconds: float = DEFAULT_SWAP_BOUND_SECONDS
    max_bypass: int = DEFAULT_MAX_BYPASS
    linger_seconds: float = DEFAULT_LINGER_SECONDS
    classes: tuple[tuple[str, str], ...] = tuple(sorted(DEFAULT_CLASSES.items()))

    def class_of(self, kind: str) -> str:
        return dict(self.classes).get(kind, INTERACTIVE)

    @classmethod
    def from_mapping(cls, table: object) -> SchedulingConfig:
        """
        Validate the parsed YAML of the ``scheduling`` section (``None`` means
        all defaults).  Kinds named under ``classes`` override the defaults one
        by one, so ``classes: {llm: batch}`` keeps images batch.

        :raises SchedulingConfigError: naming the key and the problem.
        """
        if table is None:
            return cls()
        given = _mapping(table, "")
        for key in given:
            if key not in _KEYS:
                raise SchedulingConfigError(key, f"unknown key; known keys: {', '.join(_KEYS)}")
        policy = given.get("policy", INTERACTIVE_FIRST)
        if policy not in POLICIES:
            raise SchedulingConfigError(
                "policy", f"must be one of {', '.join(POLICIES)}, not {policy!r}")
        classes = dict(DEFAULT_CLASSES)
        for kind, job_class in _mapping(given.get("classes", {}), "classes").items():
            if job_class not in JOB_CLASSES:
                raise SchedulingConfigError(
                    f"classes.{kind}", f"must be interactive or batch, not {job_class!r}")
            classes[kind] = job_class
        return cls(
            policy=policy,
            batch_guard_seconds=_seconds(given, "batch_guard_seconds",
                                         DEFAULT_BATCH_GUARD_SECONDS, positive=True),
            swap_bound_seconds=_seconds(given, "swap_bound_seconds",
                                        DEFAULT_SWAP_BOUND_SECONDS, positive=True),
            max_bypass=_count(given, "max_bypass", DEFAULT_MAX_BYPASS),
            linger_seconds=_seconds(given, "linger_seconds", DEFAULT_LINGER_SECONDS,
                                    positive=False),
            classes=tuple(sorted(classes.items())),
        )


def precedence(job_class: str, priority: int, arrived: float, id: int) -> tuple[
        bool, int, float, int]:
    """
    A job's place in (class, priority, arrival) order: interactive before
    batch, higher priority first, then arrival, the id breaking ties.  A job
    is bypassed only by one that comes after it in this order and starts
    first: interactive work going ahead of a batch job does not count against
    it, as the batch guard already bounds that wait, so a stream of voice
    turns cannot make a whole image burst due at once.
    """
    return (job_class != INTERACTIVE, -priority, arrived, id)


def _mapping(value: object, key: str) -> dict[str, object]:
    if not isinstance(value, dict) or not all(isinstance(k, str) and k for k in value):
        raise SchedulingConfigError(key or "scheduling", "must be a mapping with names as keys")
    return value


def _seconds(table: Mapping[str, object], key: str, default: float, positive: bool) -> float:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise SchedulingConfigError(key, f"must be a number of seconds, not {value!r}")
    if not (0 < value if positive else 0 <= value) or value == float("inf"):
        bound = "positive" if positive else "zero or more"
        raise SchedulingConfigError(key, f"must be {bound} and finite (got {value})")
    return float(value)


def _count(table: Mapping[str, object], key: str, default: int) -> int:
    value = table.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise SchedulingConfigError(key, f"must be a whole number of at least 1, not {value!r}")
    return value
