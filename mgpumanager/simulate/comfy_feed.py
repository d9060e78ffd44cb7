"""
ComfyUI's progress feed: the ``/ws`` clients and the JSON messages they are sent.

A client connects with ``?clientId=...`` and is greeted with a ``status`` message
carrying that id as ``sid``; afterwards it hears every queue change (``status``) and
the progress of the prompts submitted with its ``client_id``.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

from twisted.internet.interfaces import IReactorTime

from mgpumanager.simulate.websocket import WebSocketConnection, WebSocketResource


class ProgressFeed:
    """
    :param remaining: how many prompts are queued or running now.
    :param clock: to greet a client once its ``101`` is out.
    """

    def __init__(self, remaining: Callable[[], int], clock: IReactorTime) -> None:
        self._remaining = remaining
        self._clock = clock
        self._sockets: dict[str, list[WebSocketConnection]] = {}

    @property
    def clients(self) -> int:
        """Open connections."""
        return sum(len(connections) for connections in self._sockets.values())

    def accept(self, client_id: str | None) -> WebSocketResource:
        """The resource that answers one ``/ws`` handshake."""
        client = client_id or uuid.uuid4().hex
        connection = WebSocketConnection(
            on_text=lambda text: None, on_close=lambda: self._forget(client, connection)
        )
        self._sockets.setdefault(client, []).append(connection)
        self._clock.callLater(0, connection.send_json, self._status(sid=client))
        return WebSocketResource(connection)

    def send(self, client_id: str | None, kind: str, data: dict[str, Any]) -> None:
        """One message to the connections of ``client_id`` (none: nobody)."""
        if client_id is not None:
            for connection in self._sockets.get(client_id, []):
                connection.send_json({"type": kind, "data": data})

    def queue_changed(self) -> None:
        message = self._status()
        for connections in self._sockets.values():
            for connection in connections:
                connection.send_json(message)

    def close(self) -> None:
        for connections in list(self._sockets.values()):
            for connection in list(connections):
                if connection.transport is not None:
                    connection.transport.loseConnection()

    def _status(self, sid: str | None = None) -> dict[str, Any]:
        data: dict[str, Any] = {"status": {"exec_info": {"queue_remaining": self._remaining()}}}
        if sid is not None:
            data["sid"] = sid
        return {"type": "status", "data": data}

    def _forget(self, client_id: str, connection: WebSocketConnection) -> None:
        connections = self._sockets.get(client_id, [])
        if connection in connections:
            connections.remove(connection)
        if not connections:
            self._sockets.pop(client_id, None)
