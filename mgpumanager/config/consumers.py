"""
One consumer of ``consumers.yaml``: the inference server behind the facade, as the
operator declared it, and the checks that refuse a declaration we could not act on.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from types import MappingProxyType
from urllib.parse import urlsplit

import attrs

from mgpumanager.config.cards import consumer_cards, vram_per_card
from mgpumanager.config.reader import FILE_KEY, Listen, Reader, Route, file_keys

ENDPOINT_KINDS = ("tts", "stt", "llm", "image")
#: Part 1's behaviour: one GPU job per HTTP exchange, routes from the file alone.
DEFAULT_ADAPTER = "generic"
#: Keys that only make sense for one adapter; anywhere else they are a mistake.
ADAPTER_ONLY_KEYS = {"completion": "comfyui", "gpu_routes": DEFAULT_ADAPTER}


@attrs.frozen
class Timeouts:
    """How long a consumer may take: to accept, to answer, between two bytes."""

    connect_seconds: float = 5.0
    response_seconds: float = 120.0
    idle_seconds: float = 300.0
    #: How long an idle pooled connection to the consumer is kept for reuse.
    keepalive_seconds: float = 4.0


@attrs.frozen
class CompletionConfig:
    """
    How a job that outlives its HTTP exchange (a ComfyUI prompt) is followed:
    how often its end is polled, and how long it may hold the GPU at most.
    """

    poll_seconds: float = 0.5
    timeout_seconds: float = 1800.0


@attrs.frozen
class ConsumerConfig:
    """
    One inference server behind the facade, as the operator declared it.

    ``health`` is ``None`` only for a consumer whose adapter supplies its own
    health route; the generic adapter requires one in the file.
    """

    name: str = attrs.field(metadata={FILE_KEY: None})
    url: str
    health: Route | None
    paths: Mapping[str, Route]
    #: The cards its processes use (its CUDA_VISIBLE_DEVICES), resolved: without
    #: ``gpus`` in the file, every managed card.  Built by hand: card 0, the one
    #: card of a configuration without ``gpus``.
    cards: tuple[int, ...] = attrs.field(default=(0,), metadata={FILE_KEY: "gpus"})
    #: What it occupies when loaded, on the card where it occupies most (on one
    #: card: on that card).  0 = unknown, never pre-evicts.
    vram_resident_mib: int = 0
    #: What it occupies on each of its cards, when the file says per card;
    #: :meth:`vram_mib_on` is the way to read it.
    vram_by_card: Mapping[int, int] = attrs.field(
        factory=lambda: MappingProxyType({}), metadata={FILE_KEY: None}
    )
    vram_managed: bool = False
    load: Route | None = None
    unload: Route | None = None
    systemd_unit: str | None = None
    can_coexist_with: frozenset[str] = frozenset()
    priority: int = 0
    max_concurrency: int = 1
    timeouts: Timeouts = Timeouts()
    #: This consumer's request-body limit, when it differs from the global one.
    max_body_mib: int | None = None
    #: The name of the adapter that knows this server's semantics.
    adapter: str = DEFAULT_ADAPTER
    completion: CompletionConfig = CompletionConfig()
    #: The routes that are GPU jobs when passed through (generic adapter);
    #: ``None``: every POST is.
    gpu_routes: tuple[Route, ...] | None = None
    #: An extra port that answers like ``/upstream/<name>/``.
    listen: Listen | None = None

    def vram_mib_on(self, card: int) -> int:
        """What it occupies on ``card`` when loaded: 0 on a card it does not use."""
        if card not in self.cards:
            return 0
        return self.vram_by_card.get(card, self.vram_resident_mib)

    @property
    def unloadable(self) -> bool:
        """Whether the scheduler has any way to take this consumer off the card."""
        return self.unload is not None or self.systemd_unit is not None

    def initially_resident(self) -> bool:
        """
        What we believe before the first probe says otherwise.

        A consumer with an ``unload`` route but no ``load`` route (ComfyUI)
        loads its model lazily on the first job, so it starts empty.
        """
        if self.vram_managed:
            return True
        return not (self.unload is not None and self.load is None)


def parse_consumer(
    read: Reader,
    name: object,
    value: object,
    everyone: Mapping[str, object],
    managed: tuple[int, ...] = (0,),
) -> ConsumerConfig:
    """
    Check one ``consumers.<name>`` entry; ``everyone`` holds all the names and
    ``managed`` the numbers of the managed cards.
    """
    key_path = f"consumers.{name}"
    if not isinstance(name, str) or not name.strip():
        raise read.fail("consumers", f"consumer names must be non-empty strings (got {name!r})")
    table = read.mapping(value, key_path, file_keys(ConsumerConfig))
    adapter = read.optional(
        table, "adapter", key_path, partial(_adapter_name, read), DEFAULT_ADAPTER
    )
    for key, only in ADAPTER_ONLY_KEYS.items():
        if table.get(key) is not None and adapter != only:
            raise read.fail(
                f"{key_path}.{key}",
                f"only for adapter {only!r} (this consumer's adapter is {adapter!r})",
            )
    url = read.required(table, "url", key_path, read.text)
    if not _is_base_url(url):
        raise read.fail(
            f"{key_path}.url", f"must be http(s)://host:port with no path (got {url!r})"
        )

    def query_route(v: object, p: str) -> Route:
        return read.route(v, p, "GET", with_body=False)

    if adapter == DEFAULT_ADAPTER:
        health: Route | None = read.required(table, "health", key_path, query_route)
    else:  # the adapter supplies a default
        health = read.optional(table, "health", key_path, query_route, None)
    paths_table = read.section(table, "paths", key_path, ENDPOINT_KINDS)
    paths = {
        kind: read.route(route, f"{key_path}.paths.{kind}", "POST", with_body=False)
        for kind, route in paths_table.items()
    }

    def lifecycle_route(v: object, p: str) -> Route:
        return read.route(v, p, "POST", with_body=True)

    def coexist(v: object, p: str) -> frozenset[str]:
        return _coexisting(read, name, read.names(v, p), p, everyone)

    cards = read.optional(
        table, "gpus", key_path, lambda v, p: consumer_cards(read, v, p, managed), managed
    )
    no_size: tuple[int, Mapping[int, int]] = (0, {})
    vram, vram_by_card = read.optional(
        table,
        "vram_resident_mib",
        key_path,
        lambda v, p: vram_per_card(read, v, p, cards),
        no_size,
    )
    return ConsumerConfig(
        name=name,
        url=url.rstrip("/"),
        health=health,
        paths=MappingProxyType(paths),
        adapter=adapter,
        cards=cards,
        vram_resident_mib=vram,
        vram_by_card=MappingProxyType(dict(vram_by_card)),
        **read.values(
            table,
            key_path,
            ConsumerConfig,
            {
                "url": None,
                "health": None,
                "paths": None,
                "adapter": None,
                "gpus": None,
                "vram_resident_mib": None,
                "vram_managed": read.flag,
                "load": lifecycle_route,
                "unload": lifecycle_route,
                "systemd_unit": read.text,
                "can_coexist_with": coexist,
                "priority": partial(_priority, read),
                "max_concurrency": partial(_max_concurrency, read),
                "timeouts": read.nested(Timeouts),
                "max_body_mib": partial(_body_limit, read),
                "completion": read.nested(CompletionConfig),
                "gpu_routes": partial(_gpu_routes, read),
                "listen": read.listen,
            },
        ),
    )


def _adapter_name(read: Reader, value: object, key_path: str) -> str:
    # Which adapters exist is the adapter registry's business; here only the shape.
    name = read.text(value, key_path)
    if not name.isidentifier():
        raise read.fail(
            key_path, f"must be an adapter name such as {DEFAULT_ADAPTER!r} (got {name!r})"
        )
    return name


def _priority(read: Reader, value: object, key_path: str) -> int:
    priority = read.whole(value, key_path)
    if not 0 <= priority <= 4:
        raise read.fail(key_path, f"must be 0 (low) to 4 (urgent) (got {priority})")
    return priority


def _max_concurrency(read: Reader, value: object, key_path: str) -> int:
    limit = read.whole(value, key_path)
    if limit < 1:
        raise read.fail(key_path, f"must be at least 1 (got {limit})")
    if limit > 1:
        raise read.fail(
            key_path, f"only 1 is supported: one GPU lock runs one job at a time (got {limit})"
        )
    return limit


def _body_limit(read: Reader, value: object, key_path: str) -> int:
    limit = read.size_mib(value, key_path)
    if limit < 1:
        raise read.fail(key_path, "must be at least 1")
    return limit


def _coexisting(
    read: Reader,
    name: str,
    others: tuple[str, ...],
    key_path: str,
    everyone: Mapping[str, object],
) -> frozenset[str]:
    for i, other in enumerate(others):
        if other == name:
            raise read.fail(f"{key_path}[{i}]", "a consumer cannot list itself")
        read.consumer(other, f"{key_path}[{i}]", everyone)
    return frozenset(others)


def _gpu_routes(read: Reader, value: object, key_path: str) -> tuple[Route, ...]:
    if not isinstance(value, list) or not value:
        raise read.fail(
            key_path,
            "must be a list of {method, path} routes; leave it out to make every POST a GPU job",
        )
    return tuple(
        read.route(route, f"{key_path}[{i}]", "POST", with_body=False)
        for i, route in enumerate(value)
    )


def _is_base_url(url: str) -> bool:
    try:
        parsed = urlsplit(url)
        port = parsed.port
    except ValueError:
        return False
    return (
        url.isascii()
        and parsed.scheme in ("http", "https")
        and bool(parsed.hostname)
        and bool(port)
        and parsed.path in ("", "/")
        and not parsed.query
        and not parsed.fragment
        and parsed.username is None
    )
