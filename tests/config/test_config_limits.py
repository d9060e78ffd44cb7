"""
Tests for the configuration's hardening keys: ``limits.max_body_mib`` and the
per-consumer override, ``queue``, ``allowed_origins``, per-consumer
``timeouts`` and ``auth.token_file``; and the two helpers :mod:`mgpumanager.app.tap`
builds from them: whether a listen endpoint is loopback only, and the body limit
for a request path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mgpumanager.common.exposure import endpoint_is_loopback
from mgpumanager.config.document import (
    ConfigError,
    QueueConfig,
    Timeouts,
)
from mgpumanager.config.parsing import load_config, parse_config
from mgpumanager.web.api import main_port_routes
from tests.builders import consumer

MiB = 2**20
TOKEN = "0123456789abcdef-token"


def document(**top: Any) -> dict[str, Any]:
    """
    whisper (stt, and tts though tts is routed elsewhere) may take 1024 MiB;
    voice (tts) has no limit of its own; llm may take 8 MiB; image is unrouted.
    """
    return {
        "routing": {"stt": "whisper", "tts": "voice", "llm": "llm"},
        "consumers": {
            "whisper": consumer(9001, "stt", "tts", max_body_mib=1024),
            "voice": consumer(9002, "tts"),
            "llm": consumer(9003, "llm", max_body_mib=8),
        },
        **top,
    }


def error(doc: object) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(doc, source="x.yaml")
    return info.value


# --- limits.max_body_mib ---------------------------------------------------------


def test_the_body_limit_defaults_to_512_mib() -> None:
    config = parse_config({"consumers": {"a": consumer(9000)}})

    assert config.max_body_mib == 512
    assert config.body_limit_for(None) == 512 * MiB


def test_the_body_limit_can_be_set() -> None:
    config = parse_config(document(limits={"max_body_mib": 64}))

    assert config.max_body_mib == 64
    assert config.body_limit_for(None) == 64 * MiB
    assert config.body_limit_for("tts") == 64 * MiB


@pytest.mark.parametrize(
    "value,problem",
    [(0, "at least 1"), (-1, "negative"), (1.5, "whole number"), (True, "whole number"),
     ("big", "whole number")],
)
def test_a_bad_body_limit_is_refused(value: object, problem: str) -> None:
    e = error(document(limits={"max_body_mib": value}))

    assert e.key_path == "limits.max_body_mib"
    assert problem in e.problem


def test_an_unknown_limits_key_is_refused_with_a_suggestion() -> None:
    e = error(document(limits={"max_body_mb": 5}))

    assert e.key_path == "limits.max_body_mb"
    assert "did you mean 'max_body_mib'?" in e.problem


def test_a_consumer_limit_applies_to_the_kinds_routed_to_it() -> None:
    config = parse_config(document(limits={"max_body_mib": 16}))

    assert config.body_limit_for("stt") == 1024 * MiB
    assert config.body_limit_for("llm") == 8 * MiB


def test_a_consumer_limit_does_not_apply_to_other_kinds() -> None:
    config = parse_config(document(limits={"max_body_mib": 16}))

    # whisper serves tts too, but tts is routed to voice, which has no limit.
    assert config.body_limit_for("tts") == 16 * MiB
    assert config.body_limit_for("image") == 16 * MiB
    assert config.body_limit_for(None) == 16 * MiB


@pytest.mark.parametrize("value", [0, -3, "1G"])
def test_a_bad_consumer_limit_is_refused(value: object) -> None:
    doc = document()
    doc["consumers"]["voice"]["max_body_mib"] = value

    assert error(doc).key_path == "consumers.voice.max_body_mib"


# --- queue -----------------------------------------------------------------------


def test_queue_defaults() -> None:
    config = parse_config(document())

    assert config.queue == QueueConfig(max_depth=512, max_wait_seconds=600.0)


def test_queue_can_be_set_with_fractional_seconds() -> None:
    config = parse_config(document(queue={"max_depth": 3, "max_wait_seconds": 1.5}))

    assert config.queue == QueueConfig(max_depth=3, max_wait_seconds=1.5)


@pytest.mark.parametrize(
    "table,key_path",
    [
        ({"max_depth": 0}, "queue.max_depth"),
        ({"max_depth": -1}, "queue.max_depth"),
        ({"max_depth": 2.5}, "queue.max_depth"),
        ({"max_depth": True}, "queue.max_depth"),
        ({"max_wait_seconds": -1}, "queue.max_wait_seconds"),
        ({"max_wait_seconds": 0}, "queue.max_wait_seconds"),
        ({"max_wait_seconds": ".inf"}, "queue.max_wait_seconds"),
        ({"max_wait_seconds": float("inf")}, "queue.max_wait_seconds"),
        ({"max_wait": 10}, "queue.max_wait"),
    ],
)
def test_bad_queue_settings_are_refused(table: dict[str, Any], key_path: str) -> None:
    e = error(document(queue=table))

    assert e.key_path == key_path
    assert str(e).startswith(f"x.yaml: {key_path}: ")


def test_max_depth_zero_says_at_least_one() -> None:
    assert "at least 1 (got 0)" in error(document(queue={"max_depth": 0})).problem


def test_an_unknown_queue_key_gets_a_suggestion() -> None:
    assert "did you mean 'max_wait_seconds'?" in error(
        document(queue={"max_wait": 10})
    ).problem


# --- allowed_origins -------------------------------------------------------------


def test_allowed_origins_default_to_none() -> None:
    assert parse_config(document()).allowed_origins == frozenset()


def test_allowed_origins_are_a_set_of_strings() -> None:
    origins = ["http://localhost:3000", "https://app.example"]

    assert parse_config(document(allowed_origins=origins)).allowed_origins == set(origins)


@pytest.mark.parametrize(
    "value,key_path",
    [
        ("http://localhost:3000", "allowed_origins"),
        ({"a": "http://x"}, "allowed_origins"),
        (["http://ok.example", 3], "allowed_origins[1]"),
        ([""], "allowed_origins[0]"),
        ([None], "allowed_origins[0]"),
    ],
)
def test_allowed_origins_must_be_a_list_of_strings(value: object, key_path: str) -> None:
    assert error(document(allowed_origins=value)).key_path == key_path


# --- timeouts --------------------------------------------------------------------


def test_consumer_timeouts_default() -> None:
    config = parse_config(document())

    assert config.consumers["voice"].timeouts == Timeouts(5.0, 120.0, 300.0)
    timeouts = config.consumers["voice"].timeouts
    assert (timeouts.connect_seconds, timeouts.response_seconds, timeouts.idle_seconds) == (
        5,
        120,
        300,
    )


def test_consumer_timeouts_can_be_set_with_fractions() -> None:
    doc = document()
    doc["consumers"]["llm"]["timeouts"] = {
        "connect_seconds": 0.5,
        "response_seconds": 600,
        "idle_seconds": 2.25,
    }

    config = parse_config(doc)

    assert config.consumers["llm"].timeouts == Timeouts(0.5, 600.0, 2.25)
    assert config.consumers["voice"].timeouts == Timeouts()


def test_a_partial_timeouts_table_keeps_the_other_defaults() -> None:
    doc = document()
    doc["consumers"]["llm"]["timeouts"] = {"idle_seconds": 30}

    assert parse_config(doc).consumers["llm"].timeouts == Timeouts(5.0, 120.0, 30.0)


def test_an_unknown_timeouts_key_gets_a_suggestion() -> None:
    doc = document()
    doc["consumers"]["llm"]["timeouts"] = {"idle_second": 30}

    e = error(doc)

    assert e.key_path == "consumers.llm.timeouts.idle_second"
    assert "did you mean 'idle_seconds'?" in e.problem


@pytest.mark.parametrize("value", [0, -1, "5s", True, [5]])
def test_a_bad_timeout_is_refused(value: object) -> None:
    doc = document()
    doc["consumers"]["llm"]["timeouts"] = {"response_seconds": value}

    assert error(doc).key_path == "consumers.llm.timeouts.response_seconds"


def test_timeouts_must_be_a_mapping() -> None:
    doc = document()
    doc["consumers"]["llm"]["timeouts"] = 30

    assert error(doc).key_path == "consumers.llm.timeouts"


# --- auth.token_file -------------------------------------------------------------


def write_config(folder: Path, token_file: str, **top: Any) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "consumers.yaml"
    path.write_text(yaml.safe_dump(document(auth={"token_file": token_file}, **top)))
    return path


@pytest.fixture
def elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The config lives in ``etc/``; the working directory is elsewhere."""
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return tmp_path / "etc"


def test_no_auth_means_no_token() -> None:
    assert parse_config(document()).auth_token is None


def test_the_token_file_is_found_next_to_the_config_file(elsewhere: Path) -> None:
    path = write_config(elsewhere, "token")
    (elsewhere / "token").write_text(TOKEN + "\n")
    # A file of the same name in the working directory must not be read.
    Path("token").write_text("the-wrong-token-from-cwd")

    config = load_config(path)

    assert config.auth_token == TOKEN.encode()


def test_a_token_file_in_a_subfolder_is_relative_to_the_config_file(elsewhere: Path) -> None:
    path = write_config(elsewhere, "secrets/token")
    (elsewhere / "secrets").mkdir()
    (elsewhere / "secrets" / "token").write_text(TOKEN)

    assert load_config(path).auth_token == TOKEN.encode()


def test_an_absolute_token_file_is_used_as_is(elsewhere: Path, tmp_path: Path) -> None:
    token = tmp_path / "abs-token"
    token.write_text(TOKEN)
    path = write_config(elsewhere, str(token))

    assert load_config(path).auth_token == TOKEN.encode()


def test_a_missing_token_file_is_refused(elsewhere: Path) -> None:
    path = write_config(elsewhere, "missing-token")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.key_path == "auth.token_file"
    assert "missing-token" in info.value.problem
    assert str(info.value).startswith(f"{path}: auth.token_file: ")


@pytest.mark.parametrize(
    "token",
    [
        b"",
        b"\n",
        b"0123456789abcde",  # 15 characters
        b"0123456789 abcdefghij",
        b"0123456789\tabcdefghij",
        "0123456789abcdef\u00e9".encode(),
        b"0123456789abcdef\x00",
    ],
    ids=["empty", "blank", "short", "space", "tab", "non-ascii", "nul"],
)
def test_an_unusable_token_is_refused(elsewhere: Path, token: bytes) -> None:
    path = write_config(elsewhere, "token")
    (elsewhere / "token").write_bytes(token)

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.key_path == "auth.token_file"
    assert "16 printable characters" in info.value.problem
    if token.strip():
        assert token.strip().decode("latin-1") not in str(info.value)


def test_a_token_of_exactly_16_characters_is_enough(elsewhere: Path) -> None:
    path = write_config(elsewhere, "token")
    (elsewhere / "token").write_bytes(b"  0123456789abcdef\r\n")

    assert load_config(path).auth_token == b"0123456789abcdef"


def test_the_token_never_shows_in_the_config_repr(elsewhere: Path) -> None:
    path = write_config(elsewhere, "token")
    (elsewhere / "token").write_text(TOKEN)

    config = load_config(path)

    assert config.auth_token == TOKEN.encode()
    assert TOKEN not in repr(config)
    assert TOKEN not in str(config)


@pytest.mark.parametrize(
    "auth,key_path",
    [
        ({"token_file": None}, "auth.token_file"),
        ({"token_file": 5}, "auth.token_file"),
        ({"token": "x"}, "auth.token"),
        ("secret", "auth"),
    ],
)
def test_a_bad_auth_section_is_refused(auth: object, key_path: str) -> None:
    assert error(document(auth=auth)).key_path == key_path


def test_an_auth_key_typo_gets_a_suggestion() -> None:
    assert "did you mean 'token_file'?" in error(document(auth={"token_fil": "t"})).problem


# --- exposure.endpoint_is_loopback -------------------------------------------------


@pytest.mark.parametrize(
    "description,loopback",
    [
        ("tcp:8770:interface=127.0.0.1", True),
        ("tcp:8770:interface=127.5.6.7", True),
        ("tcp:8770", False),
        ("tcp:0:interface=0.0.0.0", False),
        ("tcp:8770:interface=192.168.1.10", False),
        ("tcp6:8770:interface=\\:\\:1", True),
        ("tcp6:8770:interface=\\:\\:", False),
        ("tcp:80:interface=localhost", True),
        ("tcp:80:interface=gpu-box.lan", False),
        ("tcp:port=8770:interface=127.0.0.1", True),
        ("unix:/run/x.sock", True),
        ("ssl:8443:interface=0.0.0.0", False),
    ],
)
def test_endpoint_is_loopback(description: str, loopback: bool) -> None:
    assert endpoint_is_loopback(description) is loopback


@pytest.mark.parametrize(
    "description",
    [
        "tcp:8770:interface=127.0.0.1:backlog=50",
        "tcp:interface=127.0.0.1:port=8770",
        "tcp6:8770:interface=\\:\\:1:backlog=50",
    ],
)
def test_endpoint_is_loopback_with_arguments_after_the_interface(description: str) -> None:
    assert endpoint_is_loopback(description) is True


# --- the route table's body_limit ----------------------------------------------------

LIMITED = parse_config(document(limits={"max_body_mib": 16}))


@pytest.mark.parametrize(
    "path,mib",
    [
        (b"/v1/stt", 1024),
        (b"/v1/stt?x=1", 1024),
        (b"/v1/llm?stream=true", 8),
        (b"/v1/tts", 16),
        (b"/v1/image", 16),
        (b"/v1/nope", 16),
        (b"/v1/stt/more", 16),
        (b"/v1/", 16),
        (b"/api/audio/x", 16),
        (b"/api/audio/x?v=1", 16),
        (b"/v1/status", 16),
        (b"/", 16),
        (b"", 16),
        (b"/v1/\xff", 16),
    ],
)
def test_body_limit_for_path(path: bytes, mib: int) -> None:
    assert main_port_routes(LIMITED).body_limit(b"POST", path) == mib * MiB


