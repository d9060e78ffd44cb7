"""
Load ``consumers.yaml`` into immutable values, or refuse it with one clear line.

Validation happens once, before anything listens: a daemon that starts with half a
configuration schedules the GPU wrongly in ways that only show up as an OOM hours
later, so every mistake an operator can make in the file is an error here, named by
file and key path (``consumers.comfyui.paths.image.path: required``).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs
import yaml

ENDPOINT_KINDS = ("tts", "stt", "llm", "image")
DEFAULT_LISTEN = "127.0.0.1:8770"
DEFAULT_AUDIO_PREFIX = "/api/audio/"
#: Pending connections the kernel may hold for the facade.
LISTEN_BACKLOG = 1024

_T = TypeVar("_T")


class ConfigError(Exception):
    """
    The configuration cannot be used.  ``str()`` is the single line an operator
    sees: ``<file>: <key.path>: <what is wrong>``.
    """

    def __init__(self, source: str, key_path: str, problem: str) -> None:
        self.source = source
        self.key_path = key_path
        self.problem = problem
        where = f"{key_path}: " if key_path else ""
        super().__init__(f"{source}: {where}{problem}")


@attrs.frozen
class Route:
    """
    One HTTP call the daemon makes on a consumer: a health probe, a proxied
    endpoint, or a lifecycle action.  ``body`` is sent verbatim (lifecycle only).
    """

    method: str
    path: str
    body: bytes | None = None


@attrs.frozen
class Listen:
    """Where the facade listens: a host (name or address) and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    def endpoint_description(self) -> str:
        """
        The twisted endpoint string.  Twisted's default backlog of 50 drops
        connections when a few hundred clients arrive at once (they all queue
        on the GPU lock by design), so the kernel gets room for more.
        """
        interface = self.host.replace(":", "\\:")
        return f"tcp:{self.port}:backlog={LISTEN_BACKLOG}:interface={interface}"


@attrs.frozen
class GpuConfig:
    """The card: its size when NVML cannot say, the headroom we never hand out."""

    total_mib: int | None = None
    reserved_mib: int = 1024
    poll_interval_seconds: float = 2.0


@attrs.frozen
class ProbeConfig:
    """How often consumers' health routes are called, and for how long at most."""

    interval_seconds: float = 5.0
    timeout_seconds: float = 3.0


@attrs.frozen
class LifecycleConfig:
    """
    How consumers are unloaded and loaded when the scheduler makes room.

    ``systemctl`` is the command prefix used for consumers managed by a systemd
    unit, so a deployment can say ``[sudo, -n, systemctl]``.
    """

    unload_timeout_seconds: float = 30.0
    load_timeout_seconds: float = 120.0
    verify_interval_seconds: float = 0.25
    verify_timeout_seconds: float = 10.0
    settle_seconds: float = 1.0
    systemctl: tuple[str, ...] = ("systemctl",)


@attrs.frozen
class Timeouts:
    """How long a consumer may take: to accept, to answer, between two bytes."""

    connect_seconds: float = 5.0
    response_seconds: float = 120.0
    idle_seconds: float = 300.0


@attrs.frozen
class QueueConfig:
    """Admission control: how many jobs may wait, and for how long."""

    max_depth: int = 512
    max_wait_seconds: float = 600.0


@attrs.frozen
class ConsumerConfig:
    """One inference server behind the facade, as the operator declared it."""

    name: str
    url: str
    health: Route
    paths: Mapping[str, Route]
    vram_resident_mib: int = 0
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


@attrs.frozen
class Config:
    """The whole validated configuration."""

    source: str
    listen: Listen
    gpu: GpuConfig
    probes: ProbeConfig
    lifecycle: LifecycleConfig
    routing: Mapping[str, str]
    audio_proxy: str | None
    audio_path_prefix: str
    consumers: Mapping[str, ConsumerConfig]
    shutdown_grace_seconds: float = 30.0
    max_body_mib: int = 512
    queue: QueueConfig = QueueConfig()
    allowed_origins: frozenset[str] = frozenset()
    #: The bearer token every route but /healthz requires, when set.
    auth_token: bytes | None = attrs.field(default=None, repr=False)

    def body_limit_for(self, kind: str | None) -> int:
        """The request-body limit in bytes for a job of ``kind`` (None: not a job)."""
        limit = self.max_body_mib
        target = self.route_for(kind) if kind is not None else None
        if target is not None and target[0].max_body_mib is not None:
            limit = target[0].max_body_mib
        return limit * 1024 * 1024

    def may_coexist(self, first: str, second: str) -> bool:
        """Coexistence is symmetric: either side listing the other is enough."""
        return (
            second in self.consumers[first].can_coexist_with
            or first in self.consumers[second].can_coexist_with
        )

    def route_for(self, kind: str) -> tuple[ConsumerConfig, Route] | None:
        """The consumer and route serving an endpoint kind, if configured."""
        name = self.routing.get(kind)
        if name is None:
            return None
        consumer = self.consumers[name]
        route = consumer.paths.get(kind)
        if route is None:
            return None
        return consumer, route


class _Reader:
    """
    Walks the parsed YAML, checking each mapping's keys and each value's type,
    and raising :class:`ConfigError` with the key path of the first problem.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key_path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key_path, problem)

    def mapping(
        self, value: object, key_path: str, allowed: tuple[str, ...] | None
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key_path, f"must be a mapping, not {_kind_of(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(key_path, f"keys must be strings, not {_kind_of(key)}")
            if allowed is not None and key not in allowed:
                raise self.fail(_join(key_path, key), _unknown_key(key, allowed))
        return value

    def section(self, table: Mapping[str, Any], key: str, key_path: str,
                allowed: tuple[str, ...] | None) -> dict[str, Any]:
        """A nested mapping that may be absent (or null), but not of another type."""
        value = table.get(key)
        if value is None:
            return {}
        return self.mapping(value, _join(key_path, key), allowed)

    def optional(
        self,
        table: Mapping[str, Any],
        key: str,
        key_path: str,
        convert: Callable[[object, str], _T],
        default: _T,
    ) -> _T:
        if key not in table or table[key] is None:
            return default
        return convert(table[key], _join(key_path, key))

    def required(
        self,
        table: Mapping[str, Any],
        key: str,
        key_path: str,
        convert: Callable[[object, str], _T],
    ) -> _T:
        if key not in table or table[key] is None:
            raise self.fail(_join(key_path, key), "required")
        return convert(table[key], _join(key_path, key))

    def text(self, value: object, key_path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key_path, f"must be a non-empty string, not {_kind_of(value)}")
        return value

    def size_mib(self, value: object, key_path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key_path, f"must be a whole number of MiB, not {_kind_of(value)}")
        if value < 0:
            raise self.fail(key_path, f"must not be negative (got {value})")
        return value

    def seconds(self, value: object, key_path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key_path, f"must be a number of seconds, not {_kind_of(value)}")
        try:
            seconds = float(value)
        except OverflowError:
            seconds = float("inf")
        if not 0 < seconds < float("inf"):
            raise self.fail(key_path, f"must be a positive number of seconds (got {value})")
        return seconds

    def flag(self, value: object, key_path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key_path, f"must be true or false, not {_kind_of(value)}")
        return value

    def whole(self, value: object, key_path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key_path, f"must be a whole number, not {_kind_of(value)}")
        return value

    def names(self, value: object, key_path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key_path, f"must be a list of names, not {_kind_of(value)}")
        return tuple(self.text(item, f"{key_path}[{i}]") for i, item in enumerate(value))

    def route(
        self, value: object, key_path: str, default_method: str, with_body: bool
    ) -> Route:
        allowed = ("method", "path", "body") if with_body else ("method", "path")
        table = self.mapping(value, key_path, allowed)
        method = self.optional(table, "method", key_path, self.text, default_method).upper()
        if not (method.isascii() and method.isalpha()):
            raise self.fail(_join(key_path, "method"), f"not an HTTP method: {method!r}")
        path = self.required(table, "path", key_path, self.text)
        if not path.startswith("/"):
            raise self.fail(_join(key_path, "path"), f"must start with '/' (got {path!r})")
        if not path.isascii() or any(c.isspace() or not c.isprintable() for c in path):
            raise self.fail(
                _join(key_path, "path"),
                f"must be plain ASCII without spaces; percent-encode the rest (got {path!r})",
            )
        body: bytes | None = None
        if "body" in table and table["body"] is not None:
            raw = table["body"]
            if not isinstance(raw, str):
                raise self.fail(_join(key_path, "body"), "must be a string")
            body = raw.encode("utf-8")
        return Route(method=method, path=path, body=body)


_TOP_KEYS = (
    "listen",
    "gpu",
    "probes",
    "lifecycle",
    "routing",
    "audio_proxy",
    "audio_path_prefix",
    "consumers",
    "shutdown_grace_seconds",
    "limits",
    "queue",
    "allowed_origins",
    "auth",
)
_GPU_KEYS = ("total_mib", "reserved_mib", "poll_interval_seconds")
_PROBE_KEYS = ("interval_seconds", "timeout_seconds")
_LIFECYCLE_KEYS = (
    "unload_timeout_seconds",
    "load_timeout_seconds",
    "verify_interval_seconds",
    "verify_timeout_seconds",
    "settle_seconds",
    "systemctl",
)
_CONSUMER_KEYS = (
    "url",
    "health",
    "paths",
    "vram_resident_mib",
    "vram_managed",
    "load",
    "unload",
    "systemd_unit",
    "can_coexist_with",
    "priority",
    "max_concurrency",
    "timeouts",
    "max_body_mib",
)
_TIMEOUT_KEYS = ("connect_seconds", "response_seconds", "idle_seconds")
_QUEUE_KEYS = ("max_depth", "max_wait_seconds")


def load_config(path: str | Path) -> Config:
    """
    Read and validate a configuration file.

    :raises ConfigError: for a file that cannot be read, is not YAML, or does
        not describe a usable daemon.
    """
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(source, "", f"cannot read: {e}") from None
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as e:
        problem = " ".join(str(e).split())
        raise ConfigError(source, "", f"not valid YAML: {problem}") from None
    return parse_config(document, source)


def parse_config(document: object, source: str = "<config>") -> Config:
    """Validate an already-parsed YAML document; see :func:`load_config`."""
    read = _Reader(source)
    if not isinstance(document, dict):
        raise read.fail("", f"the top level must be a mapping, not {_kind_of(document)}")
    top = read.mapping(document, "", _TOP_KEYS)

    listen = _parse_listen(read, read.optional(top, "listen", "", read.text, DEFAULT_LISTEN))

    gpu_table = read.section(top, "gpu", "", _GPU_KEYS)
    total = read.optional(gpu_table, "total_mib", "gpu", read.size_mib, None)
    gpu = GpuConfig(
        total_mib=total or None,
        reserved_mib=read.optional(gpu_table, "reserved_mib", "gpu", read.size_mib, 1024),
        poll_interval_seconds=read.optional(
            gpu_table, "poll_interval_seconds", "gpu", read.seconds, 2.0
        ),
    )

    probe_table = read.section(top, "probes", "", _PROBE_KEYS)
    probes = ProbeConfig(
        interval_seconds=read.optional(
            probe_table, "interval_seconds", "probes", read.seconds, 5.0
        ),
        timeout_seconds=read.optional(
            probe_table, "timeout_seconds", "probes", read.seconds, 3.0
        ),
    )

    lifecycle = _parse_lifecycle(read, read.section(top, "lifecycle", "", _LIFECYCLE_KEYS))

    consumers_table = read.section(top, "consumers", "", None)
    if not consumers_table:
        raise read.fail("consumers", "at least one consumer is required")
    consumers = {
        name: _parse_consumer(read, name, value, consumers_table)
        for name, value in consumers_table.items()
    }

    routing_table = read.section(top, "routing", "", ENDPOINT_KINDS)
    routing: dict[str, str] = {}
    for kind, name in routing_table.items():
        if name is None:
            continue
        name = read.text(name, f"routing.{kind}")
        if name not in consumers:
            raise read.fail(f"routing.{kind}", _unknown_consumer(name, consumers))
        routing[kind] = name

    audio_proxy = read.optional(top, "audio_proxy", "", read.text, None)
    if audio_proxy is not None and audio_proxy not in consumers:
        raise read.fail("audio_proxy", _unknown_consumer(audio_proxy, consumers))
    prefix = read.optional(top, "audio_path_prefix", "", read.text, DEFAULT_AUDIO_PREFIX)
    if not _is_clean_prefix(prefix):
        raise read.fail(
            "audio_path_prefix",
            f"must start and end with '/' and hold only plain path segments (got {prefix!r})",
        )

    no_names: tuple[str, ...] = ()
    return Config(
        source=source,
        listen=listen,
        gpu=gpu,
        probes=probes,
        lifecycle=lifecycle,
        routing=MappingProxyType(routing),
        audio_proxy=audio_proxy,
        audio_path_prefix=prefix,
        consumers=MappingProxyType(dict(sorted(consumers.items()))),
        shutdown_grace_seconds=read.optional(
            top, "shutdown_grace_seconds", "", read.seconds, 30.0
        ),
        max_body_mib=_parse_body_limit(read, read.section(top, "limits", "", ("max_body_mib",))),
        queue=_parse_queue(read, read.section(top, "queue", "", _QUEUE_KEYS)),
        allowed_origins=frozenset(
            read.optional(top, "allowed_origins", "", read.names, no_names)
        ),
        auth_token=_parse_auth(read, read.section(top, "auth", "", ("token_file",)), source),
    )


def _parse_listen(read: _Reader, value: str) -> Listen:
    try:
        parsed = urlsplit(f"//{value}")
        port = parsed.port
    except ValueError:
        parsed, port = urlsplit(""), None
    host = parsed.hostname
    if (
        not port
        or not host
        or parsed.path
        or parsed.query
        or parsed.fragment
        or "?" in value
        or "#" in value
        or parsed.username is not None
    ):
        raise read.fail("listen", f"must be host:port, such as {DEFAULT_LISTEN} (got {value!r})")
    return Listen(host=host, port=port)


def _parse_body_limit(read: _Reader, table: dict[str, Any]) -> int:
    limit = read.optional(table, "max_body_mib", "limits", read.size_mib, 512)
    if limit < 1:
        raise read.fail("limits.max_body_mib", "must be at least 1")
    return limit


def _parse_queue(read: _Reader, table: dict[str, Any]) -> QueueConfig:
    depth = read.optional(table, "max_depth", "queue", read.whole, 512)
    if depth < 1:
        raise read.fail("queue.max_depth", f"must be at least 1 (got {depth})")
    wait = read.optional(table, "max_wait_seconds", "queue", read.seconds, 600.0)
    return QueueConfig(max_depth=depth, max_wait_seconds=wait)


def _parse_auth(read: _Reader, table: dict[str, Any], source: str) -> bytes | None:
    if not table:
        return None
    name = read.required(table, "token_file", "auth", read.text)
    path = Path(name)
    if not path.is_absolute():
        path = Path(source).parent / path
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise read.fail("auth.token_file", f"cannot read {name}: {e.strerror}") from None
    if len(token) < 16 or any(c <= 32 or c >= 127 for c in token):
        raise read.fail(
            "auth.token_file", "the token must be at least 16 printable characters, no spaces"
        )
    return token


def _parse_timeouts(read: _Reader, table: dict[str, Any], key_path: str) -> Timeouts:
    defaults = Timeouts()
    return Timeouts(
        **{
            key: read.optional(table, key, key_path, read.seconds, getattr(defaults, key))
            for key in _TIMEOUT_KEYS
        }
    )


def _parse_lifecycle(read: _Reader, table: dict[str, Any]) -> LifecycleConfig:
    defaults = LifecycleConfig()
    timings = {
        key: read.optional(table, key, "lifecycle", read.seconds, getattr(defaults, key))
        for key in _LIFECYCLE_KEYS
        if key != "systemctl"
    }
    systemctl = defaults.systemctl
    if "systemctl" in table and table["systemctl"] is not None:
        command = table["systemctl"]
        if isinstance(command, str):
            command = command.split()
        systemctl = read.names(command, "lifecycle.systemctl")
        if not systemctl:
            raise read.fail("lifecycle.systemctl", "must name a command")
    return LifecycleConfig(systemctl=systemctl, **timings)


def _parse_consumer(
    read: _Reader, name: object, value: object, everyone: Mapping[str, object]
) -> ConsumerConfig:
    key_path = f"consumers.{name}"
    if not isinstance(name, str) or not name.strip():
        raise read.fail("consumers", f"consumer names must be non-empty strings (got {name!r})")
    table = read.mapping(value, key_path, _CONSUMER_KEYS)
    url = read.required(table, "url", key_path, read.text)
    if not _is_base_url(url):
        raise read.fail(
            f"{key_path}.url", f"must be http(s)://host:port with no path (got {url!r})"
        )
    health = read.required(
        table, "health", key_path, lambda v, p: read.route(v, p, "GET", with_body=False)
    )
    paths_table = read.section(table, "paths", key_path, ENDPOINT_KINDS)
    paths = {
        kind: read.route(route, f"{key_path}.paths.{kind}", "POST", with_body=False)
        for kind, route in paths_table.items()
    }

    def lifecycle_route(v: object, p: str) -> Route:
        return read.route(v, p, "POST", with_body=True)

    priority = read.optional(table, "priority", key_path, read.whole, 0)
    if not 0 <= priority <= 4:
        raise read.fail(f"{key_path}.priority", f"must be 0 (low) to 4 (urgent) (got {priority})")
    max_concurrency = read.optional(table, "max_concurrency", key_path, read.whole, 1)
    if max_concurrency < 1:
        raise read.fail(
            f"{key_path}.max_concurrency", f"must be at least 1 (got {max_concurrency})"
        )
    no_names: tuple[str, ...] = ()
    coexist = read.optional(table, "can_coexist_with", key_path, read.names, no_names)
    for i, other in enumerate(coexist):
        if other == name:
            raise read.fail(f"{key_path}.can_coexist_with[{i}]", "a consumer cannot list itself")
        if other not in everyone:
            raise read.fail(
                f"{key_path}.can_coexist_with[{i}]", _unknown_consumer(other, everyone)
            )

    return ConsumerConfig(
        name=name,
        url=url.rstrip("/"),
        health=health,
        paths=MappingProxyType(paths),
        vram_resident_mib=read.optional(table, "vram_resident_mib", key_path, read.size_mib, 0),
        vram_managed=read.optional(table, "vram_managed", key_path, read.flag, False),
        load=read.optional(table, "load", key_path, lifecycle_route, None),
        unload=read.optional(table, "unload", key_path, lifecycle_route, None),
        systemd_unit=read.optional(table, "systemd_unit", key_path, read.text, None),
        can_coexist_with=frozenset(coexist),
        priority=priority,
        max_concurrency=max_concurrency,
        timeouts=_parse_timeouts(
            read, read.section(table, "timeouts", key_path, _TIMEOUT_KEYS), f"{key_path}.timeouts"
        ),
        max_body_mib=_consumer_body_limit(read, table, key_path),
    )


def _consumer_body_limit(read: _Reader, table: dict[str, Any], key_path: str) -> int | None:
    limit = read.optional(table, "max_body_mib", key_path, read.size_mib, None)
    if limit is not None and limit < 1:
        raise read.fail(f"{key_path}.max_body_mib", "must be at least 1")
    return limit


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


def _is_clean_prefix(prefix: str) -> bool:
    if prefix == "/" or not (prefix.startswith("/") and prefix.endswith("/")):
        return False
    segments = prefix[1:-1].split("/")
    return all(
        segment not in ("", ".", "..")
        and all(c.isalnum() or c in "-_.~" for c in segment)
        for segment in segments
    )


def _join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def _kind_of(value: object) -> str:
    if value is None:
        return "nothing"
    return {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a mapping",
    }.get(type(value), type(value).__name__)


def _unknown_key(key: str, allowed: tuple[str, ...]) -> str:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(allowed)}"
    return f"unknown key{hint}"


def _unknown_consumer(name: str, consumers: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(consumers), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"names unknown consumer {name!r}{hint}"
