"""
Walk a parsed YAML document and turn its leaves into checked values.

The value classes in :mod:`mgpumanager.config.document` are the one statement of which keys a
section holds and what each defaults to: the keys a section allows are read off its
attrs fields (:func:`file_keys`), and a key the file leaves out is simply not passed,
so the class's own default applies.  This module knows the shapes of single values
(seconds, MiB, names, an HTTP route, a ``host:port``) and says precisely where a
document goes wrong.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import urlsplit

import attrs

#: Pending connections the kernel may hold for the facade.
LISTEN_BACKLOG = 1024
#: attrs metadata: the key a field has in the file when it differs from the field's
#: name, or ``None`` for a field the file does not set (the file's own name, say).
FILE_KEY = "mgpumanager.file_key"

_T = TypeVar("_T")
Convert = Callable[[object, str], Any]


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
    """Where a port listens: a host (name or address) and a TCP port."""

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


#: Where the facade listens unless the file says otherwise: loopback only.
DEFAULT_LISTEN = Listen("127.0.0.1", 8770)


def file_keys(value_class: type) -> tuple[str, ...]:
    """The keys a section of the file may hold: its value class's fields, in order."""
    keys = (field.metadata.get(FILE_KEY, field.name) for field in attrs.fields(value_class))
    return tuple(key for key in keys if key is not None)


def default_of(value_class: type, name: str) -> Any:
    """The default the value class gives its field ``name``."""
    return attrs.fields_dict(value_class)[name].default


class Reader:
    """
    Checks each mapping's keys and each value's type, raising
    :class:`ConfigError` with the key path of the first problem.
    """

    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key_path: str, problem: str) -> ConfigError:
        return ConfigError(self.source, key_path, problem)

    def mapping(
        self, value: object, key_path: str, allowed: tuple[str, ...] | None
    ) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key_path, f"must be a mapping, not {kind_of(value)}")
        for key in value:
            if not isinstance(key, str):
                raise self.fail(key_path, f"keys must be strings, not {kind_of(key)}")
            if allowed is not None and key not in allowed:
                raise self.fail(join(key_path, key), _unknown_key(key, allowed))
        return value

    def section(self, table: Mapping[str, Any], key: str, key_path: str,
                allowed: tuple[str, ...] | None) -> dict[str, Any]:
        """A nested mapping that may be absent (or null), but not of another type."""
        value = table.get(key)
        if value is None:
            return {}
        return self.mapping(value, join(key_path, key), allowed)

    def values(
        self,
        table: Mapping[str, Any],
        key_path: str,
        value_class: type,
        special: Mapping[str, Convert | None] | None = None,
    ) -> dict[str, Any]:
        """
        The keyword arguments for ``value_class`` from the keys ``table`` sets.
        ``special`` gives a key its check, or ``None`` for a key the caller reads
        itself; any other key's unit suffix picks its check (``_seconds``,
        ``_mib``).  Absent and null keys are left to the class's defaults.
        """
        special = special or {}
        found: dict[str, Any] = {}
        for field in attrs.fields(value_class):
            key = field.metadata.get(FILE_KEY, field.name)
            if key is None or table.get(key) is None:
                continue
            convert = special[key] if key in special else self._by_unit(key)
            if convert is not None:
                found[field.name] = convert(table[key], join(key_path, key))
        return found

    def nested(
        self, value_class: type, special: Mapping[str, Convert | None] | None = None
    ) -> Callable[[object, str], Any]:
        """A check for a section that builds ``value_class`` (see :meth:`values`)."""

        def convert(value: object, key_path: str) -> Any:
            table = self.mapping(value, key_path, file_keys(value_class))
            return value_class(**self.values(table, key_path, value_class, special))

        return convert

    def _by_unit(self, key: str) -> Convert:
        if key.endswith("_seconds"):
            return self.seconds
        if key.endswith("_mib"):
            return self.size_mib
        raise TypeError(f"no check for the key {key!r}: give one")

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
        return convert(table[key], join(key_path, key))

    def required(
        self,
        table: Mapping[str, Any],
        key: str,
        key_path: str,
        convert: Callable[[object, str], _T],
    ) -> _T:
        if key not in table or table[key] is None:
            raise self.fail(join(key_path, key), "required")
        return convert(table[key], join(key_path, key))

    def text(self, value: object, key_path: str) -> str:
        if not isinstance(value, str) or not value.strip():
            raise self.fail(key_path, f"must be a non-empty string, not {kind_of(value)}")
        return value

    def size_mib(self, value: object, key_path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key_path, f"must be a whole number of MiB, not {kind_of(value)}")
        if value < 0:
            raise self.fail(key_path, f"must not be negative (got {value})")
        return value

    def seconds(self, value: object, key_path: str) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(key_path, f"must be a number of seconds, not {kind_of(value)}")
        try:
            seconds = float(value)
        except OverflowError:
            seconds = float("inf")
        if not 0 < seconds < float("inf"):
            raise self.fail(key_path, f"must be a positive number of seconds (got {value})")
        return seconds

    def flag(self, value: object, key_path: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(key_path, f"must be true or false, not {kind_of(value)}")
        return value

    def whole(self, value: object, key_path: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(key_path, f"must be a whole number, not {kind_of(value)}")
        return value

    def names(self, value: object, key_path: str) -> tuple[str, ...]:
        if not isinstance(value, list):
            raise self.fail(key_path, f"must be a list of names, not {kind_of(value)}")
        return tuple(self.text(item, f"{key_path}[{i}]") for i, item in enumerate(value))

    def consumer(self, value: object, key_path: str, consumers: Mapping[str, object]) -> str:
        """A name that must be one of ``consumers``."""
        name = self.text(value, key_path)
        if name not in consumers:
            raise self.fail(key_path, unknown_consumer(name, consumers))
        return name

    def route(
        self, value: object, key_path: str, default_method: str, with_body: bool
    ) -> Route:
        allowed = file_keys(Route) if with_body else ("method", "path")
        table = self.mapping(value, key_path, allowed)
        method = self.optional(table, "method", key_path, self.text, default_method).upper()
        if not (method.isascii() and method.isalpha()):
            raise self.fail(join(key_path, "method"), f"not an HTTP method: {method!r}")
        path = self.required(table, "path", key_path, self.text)
        if not path.startswith("/"):
            raise self.fail(join(key_path, "path"), f"must start with '/' (got {path!r})")
        if not path.isascii() or any(c.isspace() or not c.isprintable() for c in path):
            raise self.fail(
                join(key_path, "path"),
                f"must be plain ASCII without spaces; percent-encode the rest (got {path!r})",
            )
        body: bytes | None = None
        if "body" in table and table["body"] is not None:
            raw = table["body"]
            if not isinstance(raw, str):
                raise self.fail(join(key_path, "body"), "must be a string")
            body = raw.encode("utf-8")
        return Route(method=method, path=path, body=body)

    def listen(self, value: object, key_path: str) -> Listen:
        """A ``host:port`` to listen on (IPv6 hosts in brackets)."""
        text = self.text(value, key_path)
        try:
            parsed = urlsplit(f"//{text}")
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
            or "?" in text
            or "#" in text
            or parsed.username is not None
        ):
            raise self.fail(
                key_path, f"must be host:port, such as {DEFAULT_LISTEN} (got {text!r})"
            )
        return Listen(host=host, port=port)


def join(key_path: str, key: str) -> str:
    return f"{key_path}.{key}" if key_path else key


def kind_of(value: object) -> str:
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


def unknown_consumer(name: str, consumers: Mapping[str, object]) -> str:
    close = difflib.get_close_matches(name, list(consumers), n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"names unknown consumer {name!r}{hint}"
