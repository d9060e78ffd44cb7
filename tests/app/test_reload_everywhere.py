"""
A reload reaches every component that reads configuration: after one, nothing
in the built daemon still refers to any part of the old configuration.  A
component that keeps a private copy and is not registered with the reload's
takers would keep acting on the old values, silently; this walks the whole
object graph of a daemon built by ``app.service.build`` to find one.
"""

from __future__ import annotations

import collections
import functools
import types
from pathlib import Path
from typing import Any

import attrs
import pytest
import yaml
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import Logger

from mgpumanager.app import daemon, service
from mgpumanager.app.reload import Reloader
from mgpumanager.app.reloading import ConfigTakers
from mgpumanager.config.document import Config
from mgpumanager.consumers.adapters import load_resolved_config
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.relay.tunnel import WebSocketTunnels
from tests.builders import consumer
from tests.support import success_result_of


def _document(**changes: Any) -> dict[str, Any]:
    document: dict[str, Any] = {
        "listen": "127.0.0.1:8770",
        "gpu": {"total_mib": 24576, "reserved_mib": 1024, "poll_interval_seconds": 2},
        "probes": {"interval_seconds": 5, "timeout_seconds": 3},
        "routing": {"tts": "voice", "image": "image", "llm": "ollama"},
        "audio_proxy": "voice",
        "consumers": {
            "voice": consumer(9001, "tts", vram_resident_mib=3000,
                              listen="127.0.0.1:9101"),
            "image": consumer(9003, "image", vram_resident_mib=9000),
            "ollama": {"url": "http://127.0.0.1:11434", "adapter": "ollama"},
        },
        "openai": {"chat": "ollama"},
        "queue": {"max_depth": 8, "max_wait_seconds": 60},
        "scheduling": {"policy": "interactive-first"},
    }
    document.update(changes)
    return document


#: Every section changed, a consumer changed, one removed and one added, the
#: token gone.
CHANGED = _document(
    gpu={"total_mib": 24576, "reserved_mib": 512, "poll_interval_seconds": 3},
    probes={"interval_seconds": 7, "timeout_seconds": 4},
    routing={"tts": "voice", "llm": "ollama", "stt": "whisper"},
    audio_path_prefix="/audio/",
    consumers={
        "voice": consumer(9001, "tts", vram_resident_mib=3500, priority=3,
                          listen="127.0.0.1:9101"),
        "ollama": {"url": "http://127.0.0.1:11434", "adapter": "ollama",
                   "timeouts": {"keepalive_seconds": 2}},
        "whisper": consumer(9004, "stt", vram_resident_mib=1500, listen="127.0.0.1:9104"),
    },
    shutdown_grace_seconds=12,
    limits={"max_body_mib": 64},
    lifecycle={"unload_timeout_seconds": 9, "systemctl": ["sudo", "-n", "systemctl"]},
    allowed_origins=["http://localhost:3000"],
    openai={"chat": "ollama", "speech": "voice"},
    queue={"max_depth": 4, "max_wait_seconds": 30},
    scheduling={"policy": "interactive-first", "max_bypass": 5},
)


def _config_values(config: Config) -> dict[int, object]:
    """
    What a configuration is made of, by identity: itself, its sections and
    consumers, and the numbers and sequences in them (each parse makes new
    ones, so a component that copied a setting out still holds the old object).
    """
    found: dict[int, object] = {}
    pending: list[object] = [config]
    while pending:
        value = pending.pop()
        if id(value) in found:
            continue
        if attrs.has(type(value)):
            found[id(value)] = value
            fields = attrs.fields(type(value))  # type: ignore[arg-type]
            pending.extend(getattr(value, field.name) for field in fields)
        elif isinstance(value, (dict, types.MappingProxyType)):
            found[id(value)] = value
            pending.extend(value.values())
        elif isinstance(value, (list, tuple, frozenset, set)):
            found[id(value)] = value
            pending.extend(value)
        elif isinstance(value, (float, bytes)):
            found[id(value)] = value
    return found


#: Not walked: shared by everything, holding nothing of one daemon.
_LEAVES = (str, bytes, int, float, complex, bool, type(None), type, types.ModuleType,
           types.BuiltinFunctionType, types.CodeType, Logger)


def _reached(root: object) -> dict[int, tuple[str, object]]:
    """
    Every object reachable from ``root``, with the first path found to it:
    through attributes, containers, closures, bound methods and partials
    (never module globals, nor the global reactor that twisted.web's site
    keeps, which holds whatever other tests left listening).
    """
    reached: dict[int, tuple[str, object]] = {id(root): ("daemon", root)}
    queue: collections.deque[tuple[object, str]] = collections.deque([(root, "daemon")])
    while queue:
        value, path = queue.popleft()
        for name, child in _children(value):
            if id(child) in reached or child is global_reactor:
                continue
            reached[id(child)] = (f"{path}{name}", child)
            if not isinstance(child, _LEAVES):
                queue.append((child, f"{path}{name}"))
    return reached


def _children(value: object) -> list[tuple[str, object]]:
    if isinstance(value, (dict, types.MappingProxyType)):
        return [(f"[{key!r}]", child) for key, child in value.items()] + [
            (f".<key {key!r}>", key) for key in value
        ]
    if isinstance(value, (list, tuple, set, frozenset, collections.deque)):
        return [(f"[{i}]", child) for i, child in enumerate(value)]
    if isinstance(value, types.MethodType):
        return [(".__self__", value.__self__)]
    if isinstance(value, types.FunctionType):
        cells = value.__closure__ or ()
        names = value.__code__.co_freevars
        children: list[tuple[str, object]] = []
        for name, cell in zip(names, cells, strict=True):
            try:
                children.append((f"<{value.__name__}:{name}>", cell.cell_contents))
            except ValueError:
                continue  # an empty cell
        defaults = list(value.__defaults__ or ()) + list((value.__kwdefaults__ or {}).values())
        return children + [(f"<{value.__name__} default>", d) for d in defaults]
    if isinstance(value, functools.partial):
        return [(".func", value.func), (".args", value.args), (".keywords", value.keywords)]
    children = []
    if hasattr(value, "__dict__"):
        children.extend((f".{name}", child) for name, child in vars(value).items())
    for klass in type(value).__mro__:
        for slot in getattr(klass, "__slots__", ()):
            if slot not in ("__dict__", "__weakref__") and hasattr(value, slot):
                children.append((f".{slot}", getattr(value, slot)))
    return children


def _built(tmp_path: Path) -> tuple[Config, daemon.ManagerService, Reloader, Path]:
    path = tmp_path / "consumers.yaml"
    token = tmp_path / "token"
    token.write_text("a-token-of-sixteen-characters-or-more\n")
    path.write_text(yaml.safe_dump(_document(auth={"token_file": str(token)})))
    config = load_resolved_config(str(path))
    daemon = service.build(config, None, MemoryReactorClock())
    reloader = next(child for child in daemon if isinstance(child, Reloader))
    return config, daemon, reloader, path


def test_after_a_reload_nothing_refers_to_the_old_configuration(tmp_path: Path) -> None:
    old, daemon, reloader, path = _built(tmp_path)
    # The walk does find configuration: before the reload, it is everywhere.
    before = _reached(daemon)
    assert [relay.drop_authorization for _, relay in before.values()
            if isinstance(relay, (ConsumerProxy, WebSocketTunnels))] == [True, True]
    assert id(old) in before
    assert _configs(before) == [old]
    assert len(_holders(before, old)) >= 10

    path.write_text(yaml.safe_dump(CHANGED))
    assert success_result_of(reloader.reload()) is True

    after = _reached(daemon)
    [new] = [config for config in _configs(after) if config is not old]
    # What the two share is only what every configuration shares (module
    # defaults such as an absent section's): the rest of the old one is stale.
    stale = _config_values(old).keys() - _config_values(new).keys()
    assert id(old) in stale and len(stale) > 10
    leaked = sorted(f"{after[key][0]}: {type(after[key][1]).__name__}"
                    for key in stale if key in after)
    assert leaked == []
    relays = [value for _, value in after.values()
              if isinstance(value, (ConsumerProxy, WebSocketTunnels))]
    assert len(relays) == 2
    assert [relay.drop_authorization for relay in relays] == [False, False]


def _holders(reached: dict[int, tuple[str, object]], value: object) -> list[str]:
    """The paths of the objects that refer to ``value`` directly."""
    return [path for path, holder in reached.values()
            if any(child is value for _, child in _children(holder))]


def _configs(reached: dict[int, tuple[str, object]]) -> list[Config]:
    return [value for _, value in reached.values() if isinstance(value, Config)]


@pytest.mark.logged_errors_expected
def test_a_taker_that_fails_leaves_the_others_to_take_the_configuration(
    tmp_path: Path, fail_on_logged_errors: list[dict[str, Any]]
) -> None:
    old, _, _, _ = _built(tmp_path)
    taken: list[str] = []

    class Taker:
        def __init__(self, name: str, fails: bool = False) -> None:
            self.name, self.fails = name, fails

        def reconfigure(self, config: Config) -> Deferred[None] | None:
            taken.append(self.name)
            if self.fails:
                raise RuntimeError("cannot")
            return succeed(None)

    takers = ConfigTakers()
    for taker in (Taker("first"), Taker("second", fails=True), Taker("third")):
        takers.add(taker.name, taker)

    success_result_of(Deferred.fromCoroutine(takers.apply(old)))

    assert taken == ["first", "second", "third"]
    assert takers.names == ["first", "second", "third"]
    [logged] = fail_on_logged_errors
    assert logged["taker"] == "second"
