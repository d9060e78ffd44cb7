"""The ``scheduling`` section as the configuration file reads it."""

from __future__ import annotations

from typing import Any

import pytest

from mgpumanager.config.parsing import parse_config
from mgpumanager.config.reader import ConfigError
from tests.builders import consumer


def document(scheduling: object) -> dict[str, Any]:
    return {"consumers": {"voice": consumer(9001, "tts")}, "scheduling": scheduling}


def test_defaults_are_interactive_first_with_images_batch() -> None:
    config = parse_config({"consumers": {"voice": consumer(9001, "tts")}})
    assert config.scheduling.policy == "interactive-first"
    assert config.scheduling.class_of("image") == "batch"
    assert config.scheduling.class_of("other") == "interactive"


def test_classes_override_one_kind_at_a_time() -> None:
    config = parse_config(document({"policy": "fifo", "classes": {"llm": "batch"}}))
    assert config.scheduling.policy == "fifo"
    assert config.scheduling.class_of("llm") == "batch"
    assert config.scheduling.class_of("image") == "batch"
    assert config.scheduling.class_of("tts") == "interactive"


@pytest.mark.parametrize(("value", "message"), [
    ({"max_bypass": 0}, "f.yaml: scheduling.max_bypass: must be a whole number"),
    ({"classes": {"image": "soon"}}, "f.yaml: scheduling.classes.image: must be interactive"),
    ({"policy": "lifo"}, "f.yaml: scheduling.policy: must be one of"),
    ({"linger": 1}, "f.yaml: scheduling.linger: unknown key"),
    ([1], "f.yaml: scheduling: must be a mapping"),
])
def test_a_bad_value_names_the_file_and_the_key(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(document(value), "f.yaml")
    assert str(info.value).startswith(message)
