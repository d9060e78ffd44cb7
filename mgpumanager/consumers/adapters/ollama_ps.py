"""
Ollama's ``/api/ps``: which models are on the card, and how much each holds.

Ollama loads models on demand and keeps each for ``keep_alive`` after its
last answer, so the daemon cannot know from its own traffic what Ollama
holds; ``/api/ps`` says, with each model's ``size_vram`` in bytes.
"""

from __future__ import annotations

from collections.abc import Mapping

from mgpumanager.config.document import ConsumerConfig
from mgpumanager.consumers.control import ConsumerControl, ControlFailed
from mgpumanager.state.registry import ModelResidency

PS_PATH = "/api/ps"
MIB = 1024 * 1024


def bytes_to_mib(size: int) -> int:
    """Whole MiB, rounded up: a partial MiB still takes memory."""
    return -(-size // MIB)


def parse_ps(document: Mapping[str, object]) -> tuple[ModelResidency, ...]:
    """The models of an ``/api/ps`` answer; entries without a name are skipped."""
    models = document.get("models")
    if not isinstance(models, list):
        return ()
    found = []
    for entry in models:
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            continue
        size = entry.get("size_vram")
        mib = bytes_to_mib(size) if isinstance(size, int) and size > 0 else 0
        expires = entry.get("expires_at")
        found.append(
            ModelResidency(entry["name"], mib, expires if isinstance(expires, str) else None)
        )
    return tuple(found)


async def loaded_models(
    control: ConsumerControl, consumer: ConsumerConfig, timeout: float
) -> tuple[ModelResidency, ...]:
    """
    What ``/api/ps`` lists now.

    :raises ControlFailed: no answer, or not a 200 with a JSON object.
    """
    code, document = await control.get_json(consumer, "GET", PS_PATH, timeout)
    if code != 200 or document is None:
        raise ControlFailed(f"GET {PS_PATH} answered HTTP {code} without a model list")
    return parse_ps(document)
