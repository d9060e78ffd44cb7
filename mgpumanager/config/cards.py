"""
The cards the daemon manages: ``gpu:`` (every card's defaults) and ``gpus:`` (the cards).

Without ``gpus`` the daemon manages one card, NVML index 0, with the settings of
``gpu:``: exactly the daemon of a one-card host.  With it, each entry names one card
by NVML index or by uuid and inherits every key of ``gpu:`` it does not set itself,
so that two identical cards need nothing but their indexes.

A card has one number everywhere the operator meets it (``consumers.<n>.gpus``, the
status, the yield route): its NVML index when the entry gives one; for an entry
given by uuid, its position in ``gpus``.  The uuid is what an operator writes when
the NVML order is not stable across reboots, so the order of the file is the only
stable number such a card has.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial

import attrs

from mgpumanager.config.reader import Reader, file_keys, join

#: The keys of a ``gpus`` entry that say which card it is.
CARD_KEYS = ("index", "uuid")


@attrs.frozen
class GpuConfig:
    """
    One card's settings: its size when NVML cannot say, the headroom we never hand
    out, how often it is read, and how the daemon makes way for guests (processes
    on the card that are no consumer of ours).
    """

    total_mib: int | None = None
    reserved_mib: int = 1024
    poll_interval_seconds: float = 2.0
    #: Between jobs, keep at least this free while guests hold memory (0 = off).
    guest_headroom_mib: int = 0
    #: Give the card to guests holding at least this much (0 = off).
    yield_to_guests_mib: int = 0
    #: How long guests must hold less before an automatic yield ends.
    yield_cooldown_seconds: float = 30.0


@attrs.frozen(kw_only=True)
class CardConfig:
    """
    One managed card: the number the configuration knows it by, the uuid it was
    named by (``None``: named by its NVML index, which is then ``index``), and its
    settings with the defaults of ``gpu:`` filled in.
    """

    index: int
    uuid: str | None = None
    settings: GpuConfig = GpuConfig()

    @property
    def nvml_index(self) -> int | None:
        """The NVML index to read it at, or ``None`` when it is found by uuid."""
        return self.index if self.uuid is None else None


def one_card(gpu: GpuConfig) -> tuple[CardConfig, ...]:
    """The cards of a configuration without ``gpus``: NVML index 0 with ``gpu:``'s settings."""
    return (CardConfig(index=0, settings=gpu),)


def card_size(read: Reader, value: object, key_path: str) -> int | None:
    """A card's ``total_mib``: 0 reads as "not given", so NVML's answer (or nothing) is used."""
    return read.size_mib(value, key_path) or None


def parse_cards(
    read: Reader, value: object, key_path: str, gpu: GpuConfig
) -> tuple[CardConfig, ...]:
    """
    Check ``gpus``: a non-empty list of cards, each named once by index or uuid.

    :param gpu: the parsed ``gpu:`` section, every entry's defaults.
    """
    if not isinstance(value, list) or not value:
        raise read.fail(
            key_path,
            "must be a list of cards such as [{index: 0}, {index: 1}]; "
            "leave it out to manage card 0 alone",
        )
    allowed = (*CARD_KEYS, *file_keys(GpuConfig))
    cards: list[CardConfig] = []
    seen: dict[object, str] = {}
    for position, entry in enumerate(value):
        entry_path = f"{key_path}[{position}]"
        table = read.mapping(entry, entry_path, allowed)
        given = [key for key in CARD_KEYS if table.get(key) is not None]
        if len(given) != 1:
            raise read.fail(
                entry_path,
                "name the card by exactly one of index (its NVML index) or uuid ('GPU-…')",
            )
        if given == ["index"]:
            index = _card_index(read, table["index"], join(entry_path, "index"))
            uuid = None
            names: tuple[object, ...] = (index,)
        else:
            uuid = _card_uuid(read, table["uuid"], join(entry_path, "uuid"))
            index = position
            names = (position, uuid)
        for name in names:
            if name in seen:
                what = f"card {name}" if isinstance(name, int) else f"uuid {name}"
                note = " (a card named by uuid is known by its place in gpus)" if uuid else ""
                raise read.fail(
                    join(entry_path, given[0]), f"{what} is already {seen[name]}{note}"
                )
            seen[name] = entry_path
        own = read.values(table, entry_path, GpuConfig, {"total_mib": partial(card_size, read)})
        settings = attrs.evolve(gpu, **own)
        cards.append(CardConfig(index=index, uuid=uuid, settings=settings))
    return tuple(cards)


def consumer_cards(
    read: Reader, value: object, key_path: str, managed: tuple[int, ...]
) -> tuple[int, ...]:
    """Check ``consumers.<n>.gpus``: some of the managed cards, each once."""
    if not isinstance(value, list) or not value:
        raise read.fail(
            key_path, "must be a list of card indexes; leave it out to use every managed card"
        )
    cards: list[int] = []
    for i, item in enumerate(value):
        item_path = f"{key_path}[{i}]"
        index = _card_index(read, item, item_path)
        if index not in managed:
            raise read.fail(item_path, unknown_card(index, managed))
        if index in cards:
            raise read.fail(item_path, f"card {index} is listed twice")
        cards.append(index)
    return tuple(cards)


def vram_per_card(
    read: Reader, value: object, key_path: str, cards: tuple[int, ...]
) -> tuple[int, Mapping[int, int]]:
    """
    Check ``consumers.<n>.vram_resident_mib``: MiB on each card the consumer uses,
    or a map from its cards to MiB (a card it leaves out: 0, unknown).

    :return: the one number the one-card scheduler reads (the most on any of its
        cards: the size that never under-counts on the card that holds most) and
        the MiB on each of ``cards``.
    """
    if not isinstance(value, dict):
        mib = read.size_mib(value, key_path)
        return mib, {card: mib for card in cards}
    sizes: dict[int, int] = dict.fromkeys(cards, 0)
    for key, mib in value.items():
        card = _map_key(key)
        entry_path = f"{key_path}.{key}"
        if card is None:
            raise read.fail(entry_path, "the keys are card indexes, such as {0: 20000, 1: 18000}")
        if card not in cards:
            theirs = ", ".join(map(str, cards))
            raise read.fail(
                entry_path, f"card {card} is not one of this consumer's cards ({theirs})"
            )
        sizes[card] = read.size_mib(mib, entry_path)
    return max(sizes.values(), default=0), sizes


def unknown_card(index: int, managed: Iterable[int]) -> str:
    return f"names unknown card {index}; the managed cards are {', '.join(map(str, managed))}"


def _card_index(read: Reader, value: object, key_path: str) -> int:
    index = read.whole(value, key_path)
    if index < 0:
        raise read.fail(key_path, f"must not be negative (got {index})")
    return index


def _card_uuid(read: Reader, value: object, key_path: str) -> str:
    uuid = read.text(value, key_path).strip()
    if not uuid.startswith("GPU-") or any(c.isspace() for c in uuid):
        raise read.fail(
            key_path, f"must be a card uuid as nvidia-smi -L prints it, 'GPU-…' (got {uuid!r})"
        )
    return uuid


def _map_key(key: object) -> int | None:
    # YAML reads {0: …} with int keys; a file written from JSON has "0".
    if isinstance(key, bool):
        return None
    if isinstance(key, int):
        return key if key >= 0 else None
    if isinstance(key, str) and key.isdigit() and key.isascii():
        return int(key)
    return None
