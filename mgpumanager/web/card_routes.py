"""
``/v1/gpus/<index>/yield``: give a card to a guest (a game, a training run)
and take it back.  ``POST`` answers once the card is held for the guest (the
job running on it ended, every consumer on it unloaded and verified);
``DELETE`` gives it back to the jobs.
"""

from __future__ import annotations

import math

from twisted.internet.defer import Deferred
from twisted.web.server import Request

from mgpumanager.common.errors import BAD_REQUEST, NOT_FOUND, ApiError
from mgpumanager.common.request_json import json_object
from mgpumanager.config.document import Config
from mgpumanager.scheduling.yields import CardYields, Yielded
from mgpumanager.web.answers import json_body
from mgpumanager.web.declare import Does, Policy, route
from mgpumanager.web.status_cards import yielded_document

#: The longest reason kept, in characters.
REASON_CHARS = 200

YIELD = Policy(Does.OWN, summary="hold a card for a guest: answers once it is held")
RESUME = Policy(Does.OWN, summary="give a yielded card back to the jobs")


class CardRoutes:
    """The cards' own routes on the main port."""

    def __init__(self, config: Config, yields: CardYields) -> None:
        self._config = config
        self._yields = yields

    def reconfigure(self, config: Config) -> None:
        """Serve a reloaded configuration's cards."""
        self._config = config

    @route("/v1/gpus/<int:index>/yield", ["POST"], YIELD)
    def yield_card(self, request: Request, index: int) -> Deferred[bytes]:
        self._managed(index)
        seconds, reason = _yield_body(request)
        held = self._yields.yield_card(index, seconds, reason)
        return held.addCallback(lambda done: self._answer(request, index, done))

    @route("/v1/gpus/<int:index>/yield", ["DELETE"], RESUME)
    def resume(self, request: Request, index: int) -> bytes:
        self._managed(index)
        self._yields.resume(index, "resumed on request")
        return self._answer(request, index, None)

    def _managed(self, index: int) -> None:
        if index not in self._config.card_indexes:
            managed = ", ".join(map(str, self._config.card_indexes))
            raise ApiError(NOT_FOUND, f"no managed card {index} (managed: {managed})")

    def _answer(self, request: Request, index: int, held: Yielded | None) -> bytes:
        return json_body(request, {
            "card": index,
            "yielded": yielded_document(held),
            "free_mib": self._yields.free_mib(index),
        })


def _yield_body(request: Request) -> tuple[float | None, str]:
    """The optional ``{"seconds", "reason"}``; anything else is a 400."""
    content = request.content
    raw = content.read(1) if content is not None else b""
    if content is not None:
        content.seek(0)
    if not raw:
        return None, ""
    body = json_object(request)
    if body is None:
        raise ApiError(BAD_REQUEST, 'the body must be a JSON object: {"seconds", "reason"}')
    unknown = sorted(set(body) - {"seconds", "reason"})
    if unknown:
        raise ApiError(BAD_REQUEST, f"unknown field {unknown[0]!r}; expected seconds, reason")
    seconds = body.get("seconds")
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int | float)
                                or not math.isfinite(seconds) or seconds <= 0):
        raise ApiError(BAD_REQUEST, "seconds must be a positive number")
    reason = body.get("reason", "")
    if not isinstance(reason, str):
        raise ApiError(BAD_REQUEST, "reason must be a string")
    return (float(seconds) if seconds is not None else None), reason[:REASON_CHARS]
