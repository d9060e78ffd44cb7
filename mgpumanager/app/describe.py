"""
What ``mgpumanager check`` says about each consumer: what the daemon will do
with it, read from the same places the daemon reads it.

The configuration is the resolved one the daemon runs on (the file's keys,
then the adapter's defaults: :func:`~mgpumanager.consumers.adapters.load_resolved_config`);
how a consumer is unloaded is its adapter's own account
(:meth:`~mgpumanager.consumers.adapters.IConsumerAdapter.unload_by`), whether
it may be evicted at all the eviction planner's rule, and how it is loaded
the lifecycle's (:func:`~mgpumanager.scheduling.eviction.load_method`, what
``/v1/plan`` says).  Nothing here decides anything of its own, so the summary
cannot drift from the daemon.
"""

from __future__ import annotations

from collections.abc import Sequence

import attrs

from mgpumanager.config.document import ENDPOINT_KINDS, OPENAI_ROLES, Config, ConsumerConfig
from mgpumanager.consumers.adapters import adapter_named
from mgpumanager.scheduling.eviction import load_method

#: What ``unload by`` says of a consumer the daemon never takes off the card.
NEVER_MANAGED = "never: it manages its own VRAM (vram_managed)"
NEVER_NO_WAY = "never: no unload route or systemd unit"


@attrs.frozen
class ConsumerSummary:
    """One consumer as the daemon will treat it; each field one line of ``check``."""

    name: str
    url: str
    adapter: str
    #: What reaches it: job kinds with their routes, OpenAI families, audio files.
    serves: tuple[str, ...]
    health: str
    vram: str
    load_by: str
    unload_by: str
    #: Its own port, if it has one.
    port: str | None = None

    def lines(self) -> list[tuple[str, str]]:
        """The summary's labelled lines, in the order ``check`` prints them."""
        rows = [
            ("serves", "; ".join(self.serves) or f"no routed kind (only /upstream/{self.name}/)"),
            ("health", self.health),
            ("vram", self.vram),
            ("load by", self.load_by),
            ("unload by", self.unload_by),
        ]
        if self.port is not None:
            rows.append(("own port", f"{self.port} (every path forwarded to it)"))
        return rows


def describe(config: Config) -> list[ConsumerSummary]:
    """Each consumer of a resolved configuration, as the daemon will treat it."""
    return [describe_consumer(config, consumer) for consumer in config.consumers.values()]


def describe_consumer(config: Config, consumer: ConsumerConfig) -> ConsumerSummary:
    health = consumer.health
    return ConsumerSummary(
        name=consumer.name,
        url=consumer.url,
        adapter=consumer.adapter,
        serves=tuple(serves(config, consumer.name)),
        health=f"{health.method} {health.path}" if health is not None else "none",
        vram=(
            "self-managed" if consumer.vram_managed
            else f"{consumer.vram_resident_mib} MiB declared"
        ),
        load_by=load_method(consumer),
        unload_by=unload_by(consumer),
        port=str(consumer.listen) if consumer.listen is not None else None,
    )


def unload_by(consumer: ConsumerConfig) -> str:
    """How the daemon takes ``consumer`` off the card when it must, or why it never does."""
    if consumer.vram_managed:
        return NEVER_MANAGED
    adapter = adapter_named(consumer.adapter)
    if not adapter.can_unload(consumer):
        return NEVER_NO_WAY
    return adapter.unload_by(consumer) or f"its adapter ({consumer.adapter})"


def serves(config: Config, name: str) -> list[str]:
    """What requests reach consumer ``name``, as the routes find it."""
    served: list[str] = []
    for kind in ENDPOINT_KINDS:
        if config.routing.get(kind) != name:
            continue
        target = config.route_for(kind)
        if target is None:
            served.append(f"{kind}: refused, no paths.{kind}")
        else:
            route = target[1]
            served.append(f"{kind} {route.method} {route.path}")
    families = [role for role in OPENAI_ROLES if getattr(config.openai, role) == name]
    models = [model for model, target in config.openai.models.items() if target == name]
    if families:
        served.append("openai " + ", ".join(families))
    if models:
        served.append("models " + ", ".join(models))
    if config.audio_proxy == name:
        served.append(f"audio GET {config.audio_path_prefix}<name>")
    return served


def render_consumers(summaries: Sequence[ConsumerSummary]) -> str:
    """The consumers' blocks: a head line, then one labelled line per field."""
    blocks: list[str] = []
    for summary in summaries:
        width = max(len(label) for label, _ in summary.lines())
        lines = [f"{summary.name}  {summary.url}  (adapter {summary.adapter})"]
        lines += [f"  {label.ljust(width)}  {value}" for label, value in summary.lines()]
        blocks.append("\n".join(lines))
    return "\n".join(blocks)
