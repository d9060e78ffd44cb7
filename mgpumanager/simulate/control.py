"""
The simulated host's control API: what a person at the desktop does to the card.

It exists so that a demo or a test can make a guest arrive (a game, a training run)
and end, and read what each card holds, over loopback HTTP with JSON:

* ``POST /guests`` with ``{"card": 0, "mib": 10240, "name": "game"}`` (``card``
  defaults to 0, ``name`` to ``"guest"``) answers 201 ``{"pid", "card", "mib",
  "name"}``: the guest holds ``mib`` on that card, and NVML's process list and
  memory show it from the next read on.
* ``DELETE /guests/<pid>`` answers 200 with the guest that ended; its memory is
  back.
* ``GET /card`` answers ``{"cards": [...], "oom_count"}``: each card's memory,
  holders (``kind`` ``consumer`` or ``guest``), ``oom_count`` (the servers'
  allocations it refused) and ``guest_refusals``.

Errors are ``{"error": code, "message": text}``: 400 ``bad_request`` for a body
that is not as above, 404 ``not_found`` for an unknown card, guest or route, 405
``method_not_allowed``, and 409 ``out_of_memory`` for a guest that does not fit in
the card's free memory (CUDA's own message; nothing is held then).

It is opened only when asked for, and only on loopback: whoever reaches it can
fill the card.
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any

from klein import Klein
from twisted.python.failure import Failure
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from werkzeug.exceptions import MethodNotAllowed, NotFound

from mgpumanager.simulate.card import CudaOutOfMemory, SimulatedCard
from mgpumanager.simulate.guests import Guest, GuestBook, UnknownCard, UnknownGuest
from mgpumanager.simulate.server import json_answer

#: The longest guest name taken: it is a label, not a document.
MAX_NAME_LENGTH = 100
_FIELDS = frozenset({"card", "mib", "name"})


class ControlError(Exception):
    """A request the control API refuses: its status, code and message."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


def control_address(text: str) -> tuple[str, int]:
    """
    ``HOST:PORT`` of the control API (port 0: any free one).

    :raises ValueError: for anything else, or a host that is not loopback.
    """
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not port_text.isdigit() or int(port_text) > 65535:
        raise ValueError(f"not HOST:PORT: {text!r}")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback or ":" in host:
        raise ValueError(f"the control API listens on an IPv4 loopback address only: {text!r}")
    return host, int(port_text)


class ControlApi:
    """
    The routes over a host's cards and guests.

    :param cards: the host's cards, in NVML order.
    :param guests: the host's guests.
    """

    app = Klein()

    def __init__(self, cards: list[SimulatedCard], guests: GuestBook) -> None:
        self._cards = cards
        self._guests = guests

    @app.route("/guests", methods=["POST"])
    def add_guest(self, request: Request) -> bytes:
        card, mib, name = _guest_fields(_json_object(request))
        try:
            guest = self._guests.arrive(card, mib, name)
        except UnknownCard as e:
            raise ControlError(404, "not_found", str(e)) from None
        except CudaOutOfMemory as e:
            raise ControlError(409, "out_of_memory", str(e)) from None
        return json_answer(request, guest.to_json(), 201)

    @app.route("/guests/<pid>", methods=["DELETE"])
    def end_guest(self, request: Request, pid: str) -> bytes:
        if not pid.isdigit():
            raise ControlError(404, "not_found", f"no guest with pid {pid!r}")
        try:
            guest = self._guests.leave(int(pid))
        except UnknownGuest as e:
            raise ControlError(404, "not_found", str(e)) from None
        return json_answer(request, guest.to_json())

    @app.route("/card", methods=["GET"])
    def cards(self, request: Request) -> bytes:
        document = {
            "cards": [self._card(card) for card in self._cards],
            "oom_count": sum(card.oom_count for card in self._cards),
        }
        return json_answer(request, document)

    def _card(self, card: SimulatedCard) -> dict[str, Any]:
        state = card.snapshot()
        guests = self._guests.by_owner()
        holders = []
        for process in state.processes:
            guest: Guest | None = guests.get(process.owner)
            holders.append({
                "pid": process.pid,
                "name": guest.name if guest is not None else process.owner,
                "mib": process.used_mib,
                "kind": "consumer" if guest is None else "guest",
            })
        return {
            "index": card.index,
            "uuid": state.uuid,
            "name": state.name,
            "total_mib": state.total_mib,
            "used_mib": state.used_mib,
            "free_mib": state.free_mib,
            "holders": holders,
            "oom_count": card.oom_count,
            "guest_refusals": self._guests.refusals[card.index],
        }

    @app.handle_errors(ControlError)
    def refused(self, request: IRequest, failure: Failure) -> bytes:
        error = failure.value
        assert isinstance(error, ControlError)
        return json_answer(request, {"error": error.code, "message": error.message}, error.status)

    @app.handle_errors(NotFound)
    def no_route(self, request: IRequest, failure: Failure) -> bytes:
        path = request.path.decode("latin-1")
        routes = "POST /guests, DELETE /guests/<pid>, GET /card"
        message = f"no route {path} (the routes: {routes})"
        return json_answer(request, {"error": "not_found", "message": message}, 404)

    @app.handle_errors(MethodNotAllowed)
    def wrong_method(self, request: IRequest, failure: Failure) -> bytes:
        method = request.method.decode("latin-1")
        path = request.path.decode("latin-1")
        message = f"{method} is not allowed on {path}"
        return json_answer(request, {"error": "method_not_allowed", "message": message}, 405)


def _json_object(request: Request) -> dict[str, Any]:
    raw = request.content.read() if request.content is not None else b""
    try:
        document = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ControlError(400, "bad_request", f"the body is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise ControlError(400, "bad_request", "the body must be a JSON object")
    return document


def _guest_fields(body: dict[str, Any]) -> tuple[int, int, str]:
    """``card``, ``mib`` and ``name`` of a new guest, each checked."""
    unknown = sorted(set(body) - _FIELDS)
    if unknown:
        raise ControlError(
            400, "bad_request", f"unknown field(s) {', '.join(unknown)}: card, mib, name"
        )
    if "mib" not in body:
        raise ControlError(400, "bad_request", "mib is required: the MiB the guest holds")
    card, mib, name = body.get("card", 0), body["mib"], body.get("name", "guest")
    if not _is_int(card) or card < 0:
        raise ControlError(400, "bad_request", f"card must be a card index, not {card!r}")
    if not _is_int(mib) or mib <= 0:
        raise ControlError(400, "bad_request", f"mib must be a positive integer, not {mib!r}")
    if (
        not isinstance(name, str)
        or not name.strip()
        or not name.isprintable()
        or len(name) > MAX_NAME_LENGTH
    ):
        raise ControlError(
            400, "bad_request", f"name must be printable text of 1 to {MAX_NAME_LENGTH} characters"
        )
    return card, mib, name.strip()


def _is_int(value: object) -> bool:
    # JSON's true is a Python int; a card or a size is never a boolean.
    return isinstance(value, int) and not isinstance(value, bool)
