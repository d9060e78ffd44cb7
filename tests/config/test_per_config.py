"""
Tests for :class:`mgpumanager.config.configured.PerConfig`: an answer is read
once per argument and kept, until a reload, after which it is read from the
new configuration.
"""

from __future__ import annotations

from mgpumanager.config.configured import PerConfig
from mgpumanager.config.document import Config
from mgpumanager.config.parsing import parse_config
from tests.builders import consumer


def test_an_answer_is_kept_until_a_reload_reads_it_again() -> None:
    first = parse_config({"consumers": {"a": consumer(9001, "tts")}})
    second = parse_config({"consumers": {"b": consumer(9002, "stt")}})
    reads: list[str] = []

    def configured(config: Config, name: str) -> bool:
        reads.append(name)
        return name in config.consumers

    per_config = PerConfig(first, configured)

    assert (per_config("a"), per_config("a")) == (True, True)
    assert reads == ["a"]

    per_config.reconfigure(second)

    assert (per_config("a"), per_config("b")) == (False, True)
    assert reads == ["a", "a", "b"]
