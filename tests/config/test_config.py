"""
Tests for :mod:`mgpumanager.config.document`: the shipped example loads, every mistake the
spec lists is refused with the right key path and a helpful one-line message, and no
document whatever makes the loader raise anything but :class:`ConfigError`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import attrs
import hypothesis
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mgpumanager.config.document import (
    Config,
    ConfigError,
    ConsumerConfig,
    Listen,
    Route,
)
from mgpumanager.config.parsing import load_config, parse_config

EXAMPLE_PATH = Path(__file__).resolve().parents[2] / "config" / "consumers.yaml"
EXAMPLE: dict[str, Any] = yaml.safe_load(EXAMPLE_PATH.read_text(encoding="utf-8"))
DELETE = object()


def example(**edits: Any) -> dict[str, Any]:
    """A deep copy of the shipped example with dotted-path edits (``DELETE`` removes)."""
    document = copy.deepcopy(EXAMPLE)
    for dotted, value in edits.items():
        *parents, last = dotted.split("__")
        table = document
        for key in parents:
            table = table.setdefault(key, {})
        if value is DELETE:
            del table[last]
        else:
            table[last] = value
    return document


def minimal(**consumer: Any) -> dict[str, Any]:
    """A one-consumer document; keyword arguments extend consumer ``a``."""
    a = {"url": "http://127.0.0.1:9000", "health": {"path": "/health"}, **consumer}
    return {"consumers": {"a": a}}


def error(document: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(document, source="x.yaml")
    return info.value


def assert_error(document: object, key_path: str, *hints: str) -> ConfigError:
    """The document is refused at ``key_path`` with every hint in the message."""
    err = error(document)
    assert err.key_path == key_path
    assert str(err).startswith(f"x.yaml: {key_path}: " if key_path else "x.yaml: ")
    for hint in hints:
        assert hint in err.problem
    return err


def write(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "c.yaml"
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


# -- the shipped example -------------------------------------------------------------------


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(EXAMPLE_PATH)


def test_example_loads(config: Config) -> None:
    assert config.source == str(EXAMPLE_PATH)
    assert set(config.consumers) == {"mvoice", "ollama", "comfyui", "whisper"}
    assert dict(config.routing) == {
        "tts": "mvoice",
        "stt": "mvoice",
        "llm": "ollama",
        "image": "comfyui",
    }
    assert config.audio_proxy == "mvoice"
    assert config.audio_path_prefix == "/api/audio/"
    assert config.listen == Listen("127.0.0.1", 8770)
    assert (config.gpu.total_mib, config.gpu.reserved_mib) == (24576, 1024)
    assert config.probes.interval_seconds == 5.0


def test_example_defaults(config: Config) -> None:
    from mgpumanager.consumers.adapters import with_adapter_defaults

    ollama = with_adapter_defaults(config).consumers["ollama"]
    assert ollama.adapter == "ollama"
    assert ollama.health == Route("GET", "/api/version")
    assert ollama.paths["llm"] == Route("POST", "/api/generate")
    assert (ollama.max_concurrency, ollama.priority, ollama.vram_managed) == (1, 0, False)
    assert config.consumers["mvoice"].priority == 2


def test_example_lifecycle(config: Config) -> None:
    from mgpumanager.consumers.adapters import with_adapter_defaults
    from mgpumanager.consumers.adapters.comfyui import FREE_BODY

    resolved = with_adapter_defaults(config)
    assert resolved.consumers["comfyui"].unload == Route("POST", "/free", FREE_BODY)
    assert resolved.consumers["comfyui"].load is None
    assert config.consumers["whisper"].systemd_unit == "whisper-server.service"
    assert config.consumers["whisper"].unloadable
    # Ollama has no unload route: its adapter unloads it with keep_alive 0.
    assert not config.consumers["ollama"].unloadable


def test_methods_are_upper_cased() -> None:
    document = minimal(
        health={"method": "head", "path": "/h"}, paths={"llm": {"method": "put", "path": "/x"}}
    )
    consumer = parse_config(document).consumers["a"]
    assert consumer.health.method == "HEAD"
    assert consumer.paths["llm"].method == "PUT"


def test_values_are_immutable(config: Config) -> None:
    consumer = config.consumers["mvoice"]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        config.audio_proxy = "ollama"  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        consumer.priority = 4  # type: ignore[misc]
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        consumer.health.path = "/other"  # type: ignore[misc]
    for mapping in (config.consumers, config.routing, consumer.paths):
        with pytest.raises(TypeError):
            mapping["tts"] = None  # type: ignore[index]
    assert isinstance(consumer.can_coexist_with, frozenset)


def test_consumers_iterate_in_name_order(config: Config) -> None:
    assert list(config.consumers) == ["comfyui", "mvoice", "ollama", "whisper"]


# -- semantics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("mvoice", "ollama", True),  # both list each other
        ("ollama", "whisper", True),  # only ollama lists whisper
        ("whisper", "ollama", True),
        ("comfyui", "whisper", False),  # neither lists the other
        ("whisper", "comfyui", False),
    ],
)
def test_may_coexist_is_symmetric(config: Config, first: str, second: str, expected: bool) -> None:
    assert config.may_coexist(first, second) is expected


@pytest.mark.parametrize(
    ("consumer", "expected"),
    [
        ({"vram_managed": True, "unload": {"path": "/u"}}, True),
        ({"unload": {"path": "/u"}}, False),
        ({"load": {"path": "/l"}, "unload": {"path": "/u"}}, True),
        ({}, True),
    ],
    ids=["vram_managed", "unload-only", "load-and-unload", "nothing"],
)
def test_initially_resident(consumer: dict[str, Any], expected: bool) -> None:
    parsed: ConsumerConfig = parse_config(minimal(**consumer)).consumers["a"]
    assert parsed.initially_resident() is expected


def test_route_for(config: Config) -> None:
    found = config.route_for("tts")
    assert found is not None
    assert (found[0].name, found[1]) == ("mvoice", Route("POST", "/api/synthesize"))
    assert parse_config(minimal()).route_for("tts") is None  # nothing routed


def test_route_for_consumer_without_that_path() -> None:
    config = parse_config(example(routing__llm="whisper"))
    assert config.routing["llm"] == "whisper"
    assert config.route_for("llm") is None


# -- listen --------------------------------------------------------------------------------


def test_listen_default() -> None:
    listen = parse_config(minimal()).listen
    assert (listen.host, listen.port) == ("127.0.0.1", 8770)
    assert listen.endpoint_description() == "tcp:8770:backlog=1024:interface=127.0.0.1"


def test_listen_ipv6() -> None:
    listen = parse_config({**minimal(), "listen": "[::1]:9000"}).listen
    assert (listen.host, listen.port) == ("::1", 9000)
    assert str(listen) == "[::1]:9000"
    assert listen.endpoint_description() == "tcp:9000:backlog=1024:interface=\\:\\:1"


def test_listen_on_every_interface_parses() -> None:
    listen = parse_config({**minimal(), "listen": "0.0.0.0:80"}).listen
    assert (listen.host, listen.port) == ("0.0.0.0", 80)


@pytest.mark.parametrize("listen", ["nohost", "host:notaport", ":8770", "h:70000", "h:1/x"])
def test_listen_rejected(listen: str) -> None:
    assert_error({**minimal(), "listen": listen}, "listen", "host:port", repr(listen))


# -- errors the spec lists -----------------------------------------------------------------


@pytest.mark.parametrize("document", [{}, {"consumers": {}}, {"consumers": None}])
def test_no_consumers(document: dict[str, Any]) -> None:
    assert_error(document, "consumers", "at least one consumer")


def test_consumer_without_url() -> None:
    assert_error(example(consumers__whisper__url=DELETE), "consumers.whisper.url", "required")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://127.0.0.1:8080",
        "http://127.0.0.1",
        "http://127.0.0.1:8080/inference",
        "not a url",
        "http://127.0.0.1:65536",
        "http://127.0.0.1:99999",
        "http://:8080",
        "http://user@127.0.0.1:8080",
    ],
)
def test_bad_url(url: str) -> None:
    key_path = "consumers.whisper.url"
    assert_error(example(consumers__whisper__url=url), key_path, "http(s)://host:port", url)


def test_https_url_with_trailing_slash_is_accepted() -> None:
    config = parse_config(example(consumers__whisper__url="https://gpu-box:8080/"))
    assert config.consumers["whisper"].url == "https://gpu-box:8080"


def test_missing_health() -> None:
    document = example(consumers__whisper__health=DELETE)
    assert_error(document, "consumers.whisper.health", "required")


def test_missing_health_path() -> None:
    document = example(consumers__whisper__health={"method": "GET"})
    assert_error(document, "consumers.whisper.health.path", "required")


def test_endpoint_without_path() -> None:
    document = example(consumers__comfyui__paths={"image": {"method": "POST"}})
    assert_error(document, "consumers.comfyui.paths.image.path", "required")


def test_unknown_endpoint_kind_in_paths() -> None:
    document = example(consumers__whisper__paths={"video": {"path": "/v"}})
    assert_error(document, "consumers.whisper.paths.video", "unknown key", "tts, stt, llm, image")


def test_unknown_endpoint_kind_in_routing() -> None:
    assert_error(example(routing__video="whisper"), "routing.video", "unknown key", "image")


def test_routing_names_unknown_consumer() -> None:
    err = assert_error(example(routing__stt="nobody"), "routing.stt", "unknown consumer 'nobody'")
    assert "did you mean" not in err.problem


def test_routing_suggests_near_miss() -> None:
    assert_error(example(routing__stt="whispr"), "routing.stt", "did you mean 'whisper'?")


def test_audio_proxy_names_unknown_consumer() -> None:
    assert_error(example(audio_proxy="mvoce"), "audio_proxy", "'mvoce'", "did you mean 'mvoice'?")


def test_can_coexist_with_unknown_consumer() -> None:
    document = example(consumers__whisper__can_coexist_with=["olama"])
    err = assert_error(document, "consumers.whisper.can_coexist_with[0]", "'olama'")
    assert "did you mean 'ollama'?" in err.problem


def test_can_coexist_with_unknown_consumer_index() -> None:
    document = example(consumers__mvoice__can_coexist_with=["ollama", "nobody"])
    assert_error(document, "consumers.mvoice.can_coexist_with[1]", "'nobody'")


def test_can_coexist_with_itself() -> None:
    document = example(consumers__whisper__can_coexist_with=["ollama", "whisper"])
    assert_error(document, "consumers.whisper.can_coexist_with[1]", "cannot list itself")


@pytest.mark.parametrize("prefix", ["api/audio/", "/api/audio", "/", "/a//b/", "/../", "/a b/"])
def test_malformed_audio_path_prefix(prefix: str) -> None:
    assert_error(example(audio_path_prefix=prefix), "audio_path_prefix", "'/'", repr(prefix))


def test_audio_path_prefix_default_and_custom() -> None:
    assert parse_config(minimal()).audio_path_prefix == "/api/audio/"
    config = parse_config({**minimal(), "audio_path_prefix": "/media/v1.0/"})
    assert config.audio_path_prefix == "/media/v1.0/"


@pytest.mark.parametrize(
    ("dotted", "key_path"),
    [
        ("consumers__whisper__vram_resident_mib", "consumers.whisper.vram_resident_mib"),
        ("gpu__reserved_mib", "gpu.reserved_mib"),
        ("gpu__total_mib", "gpu.total_mib"),
    ],
)
def test_negative_size(dotted: str, key_path: str) -> None:
    assert_error(example(**{dotted: -1}), key_path, "must not be negative", "-1")


@pytest.mark.parametrize("priority", [-1, 5])
def test_priority_out_of_range(priority: int) -> None:
    key_path = "consumers.mvoice.priority"
    assert_error(example(consumers__mvoice__priority=priority), key_path, "0 (low) to 4 (urgent)")


@pytest.mark.parametrize("priority", [True, 1.5, "2"])
def test_priority_not_an_integer(priority: object) -> None:
    key_path = "consumers.mvoice.priority"
    assert_error(example(consumers__mvoice__priority=priority), key_path, "whole number")


@pytest.mark.parametrize("value", [0, -3])
def test_max_concurrency_below_one(value: int) -> None:
    key_path = "consumers.mvoice.max_concurrency"
    assert_error(example(consumers__mvoice__max_concurrency=value), key_path, "at least 1")


def test_max_concurrency_null_defaults_to_one() -> None:
    config = parse_config(example(consumers__mvoice__max_concurrency=None))
    assert config.consumers["mvoice"].max_concurrency == 1


@pytest.mark.parametrize(
    ("dotted", "key_path", "hint"),
    [
        ("listne", "listne", "did you mean 'listen'?"),
        ("gpu__reserved", "gpu.reserved", "did you mean 'reserved_mib'?"),
        ("probes__interval", "probes.interval", "did you mean 'interval_seconds'?"),
        (
            "consumers__whisper__vram_resident_mb",
            "consumers.whisper.vram_resident_mb",
            "did you mean 'vram_resident_mib'?",
        ),
        ("consumers__mvoice__health__pth", "consumers.mvoice.health.pth", "'path'"),
        ("consumers__mvoice__load__headers", "consumers.mvoice.load.headers", "known keys"),
        ("consumers__mvoice__paths__tts__body", "consumers.mvoice.paths.tts.body", "method"),
    ],
)
def test_unknown_key(dotted: str, key_path: str, hint: str) -> None:
    assert_error(example(**{dotted: 1}), key_path, "unknown key", hint)


@pytest.mark.parametrize(
    ("dotted", "key_path"),
    [
        ("probes__interval_seconds", "probes.interval_seconds"),
        ("probes__timeout_seconds", "probes.timeout_seconds"),
        ("gpu__poll_interval_seconds", "gpu.poll_interval_seconds"),
        ("shutdown_grace_seconds", "shutdown_grace_seconds"),
    ],
)
@pytest.mark.parametrize("seconds", [0, -1, math.nan, math.inf])
def test_non_positive_interval(dotted: str, key_path: str, seconds: float) -> None:
    assert_error(example(**{dotted: seconds}), key_path, "positive number of seconds")


def test_fractional_seconds_accepted() -> None:
    config = parse_config(example(probes__interval_seconds=0.5, gpu__poll_interval_seconds=0.5))
    assert (config.probes.interval_seconds, config.gpu.poll_interval_seconds) == (0.5, 0.5)


@pytest.mark.parametrize(
    ("document", "kind"),
    [([1, 2], "a list"), ("consumers", "a string"), (42, "a number"), (None, "nothing")],
)
def test_document_not_a_mapping(document: object, kind: str) -> None:
    assert_error(document, "", "must be a mapping", kind)


# -- files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        ("- mvoice\n- ollama\n", "must be a mapping, not a list"),
        ("42\n", "must be a mapping, not a number"),
        ("", "must be a mapping, not nothing"),
        ("consumers: [unclosed\n", "not valid YAML"),
        ("a: b\n c: d\n", "not valid YAML"),
        (b"consumers: \xff\xfe\n", "cannot read"),
    ],
    ids=["list", "scalar", "empty", "unclosed", "bad-indent", "not-utf8"],
)
def test_unusable_file(tmp_path: Path, text: str | bytes, hint: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert (info.value.source, info.value.key_path) == (str(path), "")
    assert hint in info.value.problem


@pytest.mark.parametrize("name", ["missing.yaml", "."])
def test_unreadable_file(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.key_path == ""
    assert str(info.value).startswith(f"{path}: cannot read")


def test_file_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "consumers:\n  a:\n    url: [\n\n  b: {\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message


def test_key_error_is_one_line_naming_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(example(consumers__comfyui__paths={"image": {}})))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: consumers.comfyui.paths.image.path: required"


# -- bugs ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dotted", "key_path", "value"),
    [
        ("listen", "listen", "[::1:8770"),
        ("listen", "listen", "a\uff03b:8770"),
        ("consumers__whisper__url", "consumers.whisper.url", "http://[::1:8080"),
        ("consumers__whisper__url", "consumers.whisper.url", "http://[gpu]:8080"),
    ],
    ids=["listen-bracket", "listen-nfkc", "url-bracket", "url-bad-ipv6"],
)
def test_unparseable_host_is_config_error(dotted: str, key_path: str, value: str) -> None:
    assert_error(example(**{dotted: value}), key_path)


def test_huge_seconds_is_config_error() -> None:
    assert_error(example(probes__interval_seconds=10**400), "probes.interval_seconds")


def test_url_port_zero_rejected() -> None:
    assert_error(example(consumers__whisper__url="http://127.0.0.1:0"), "consumers.whisper.url")


@pytest.mark.parametrize("listen", ["127.0.0.1:8770?x", "127.0.0.1:8770#x"])
def test_listen_trailing_junk_rejected(listen: str) -> None:
    assert_error(example(listen=listen), "listen", "host:port")


@pytest.mark.parametrize(
    ("dotted", "key_path"),
    [
        ("gpu", "gpu"),
        ("probes", "probes"),
        ("routing", "routing"),
        ("lifecycle", "lifecycle"),
        ("consumers__whisper__paths", "consumers.whisper.paths"),
    ],
)
@pytest.mark.parametrize("value", [[], 0], ids=["list", "zero"])
def test_section_must_be_a_mapping(dotted: str, key_path: str, value: object) -> None:
    assert_error(example(**{dotted: value}), key_path, "must be a mapping")


# -- property: only ConfigError, ever ------------------------------------------------------

TOP_KEYS = [*sorted(EXAMPLE), "lifecycle"]
KNOWN_KEYS = sorted(
    {key for table in (EXAMPLE, *EXAMPLE["consumers"].values()) for key in table}
    | {key for name in ("gpu", "probes", "routing") for key in EXAMPLE[name]}
    | {"method", "path", "body", "lifecycle", "systemctl", "settle_seconds", "mvoice"}
)
URL_ISH = st.text(alphabet="[]:/.@?#%-hx09\uff03\u2100", min_size=1, max_size=8)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(max_size=8)
    | URL_ISH
    | URL_ISH.map("http://".__add__)
    | st.sampled_from(KNOWN_KEYS)
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(KNOWN_KEYS) | SCALARS, inner, max_size=4)
    ),
    max_leaves=12,
)


def _slots(value: object) -> list[tuple[Any, Any]]:
    """Every (container, key) in a nested document, for mutating in place."""
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return []
    return [(value, key) for key, _ in items] + [s for _, v in items for s in _slots(v)]


@st.composite
def documents(draw: st.DrawFn) -> object:
    """A random document, or the example with one to three random edits."""
    if draw(st.booleans()):
        return draw(st.dictionaries(st.sampled_from(TOP_KEYS), VALUES, max_size=4) | VALUES)
    document = copy.deepcopy(EXAMPLE)
    for _ in range(draw(st.integers(1, 3))):
        slots = _slots(document)
        if not slots:
            break
        edit = draw(st.sampled_from(["delete", "replace", "splice"]))
        if edit == "splice":  # splice a few awkward characters into a string
            slots = [(c, k) for c, k in slots if isinstance(c[k], str)] or slots
        container, key = draw(st.sampled_from(slots))
        if edit == "delete":
            del container[key]
        elif edit == "replace" or not isinstance(container[key], str):
            container[key] = draw(SCALARS | VALUES)
        else:
            text = container[key]
            at = draw(st.integers(0, len(text)))
            container[key] = text[:at] + draw(URL_ISH) + text[at:]
    return document


@hypothesis.example(example(listen="[127.0.0.1:8770"))  # found by this test
@hypothesis.example(example(probes__interval_seconds=10**400))
@settings(
    max_examples=300,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(documents())
def test_only_config_error_escapes(document: object) -> None:
    try:
        result = parse_config(document, source="fuzz.yaml")
    except ConfigError as err:
        assert str(err).startswith("fuzz.yaml: ")
        assert "\n" not in str(err)
    else:
        assert isinstance(result, Config)
