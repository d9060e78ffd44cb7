"""
A scripted consumer for proxy tests: a real HTTP server whose behaviour each
request chooses with its query string (``?do=stream&lines=10``), so one daemon
configuration serves every end-to-end scenario.

Every request is recorded, and a tracker shared by several upstreams counts
how many jobs run at once across all of them: the daemon's GPU lock promises
that is never more than one.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import time
from typing import Any
from urllib.parse import parse_qs

import attrs
from twisted.internet import reactor as global_reactor
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site


@attrs.define
class Tracker:
    """Counts concurrent jobs across every upstream that shares it."""

    active: int = 0
    max_active: int = 0
    intervals: list[tuple[str, float, float]] = attrs.Factory(list)

    def enter(self) -> float:
        self.active += 1
        self.max_active = max(self.max_active, self.active)
        return time.monotonic()

    def leave(self, name: str, started: float) -> None:
        self.active -= 1
        self.intervals.append((name, started, time.monotonic()))


@attrs.define
class Seen:
    """One request as the upstream received it."""

    method: str
    path: str
    query: str
    headers: list[tuple[str, str]]
    body_length: int
    body_sha256: str

    def header(self, name: str) -> list[str]:
        return [v for k, v in self.headers if k.lower() == name.lower()]


class ScriptedUpstream(Resource):
    isLeaf = True

    def __init__(self, name: str, tracker: Tracker, reactor: Any = global_reactor) -> None:
        super().__init__()
        self.name = name
        self.tracker = tracker
        self.reactor = reactor
        self.seen: list[Seen] = []
        self.disconnects = 0
        self.lines_sent = 0
        self.healthy = True
        self.health_answer: dict[str, Any] = {"status": "ok"}

    def render(self, request: Request) -> bytes | int:
        body = request.content.read() if request.content is not None else b""
        raw_path, _, query = request.uri.partition(b"?")
        self.seen.append(
            Seen(
                method=request.method.decode(),
                path=raw_path.decode(),
                query=query.decode(),
                headers=[
                    (k.decode(), v.decode("latin-1"))
                    for k, vs in request.requestHeaders.getAllRawHeaders()
                    for v in vs
                ],
                body_length=len(body),
                body_sha256=hashlib.sha256(body).hexdigest(),
            )
        )
        if raw_path.endswith(b"/health"):
            return self._health(request)
        args = {k.decode(): v[0].decode() for k, v in parse_qs(query).items()}
        action = getattr(self, "do_" + args.get("do", "echo"), None)
        if action is None:
            request.setResponseCode(400)
            return b"unknown action"
        started = self.tracker.enter()
        finished = request.notifyFinish()

        def done(result: object) -> None:
            self.tracker.leave(self.name, started)

        def gone(failure: object) -> None:
            self.disconnects += 1
            done(None)

        finished.addCallbacks(done, gone)
        result: bytes | int = action(request, args, body)
        return result

    def _health(self, request: Request) -> bytes:
        if not self.healthy:
            request.setResponseCode(500)
            return b"unhealthy"
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(self.health_answer).encode()

    def do_echo(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """Answers what it received, after ``ms`` milliseconds."""
        seen = self.seen[-1]
        answer = json.dumps(
            {
                "upstream": self.name,
                "method": seen.method,
                "path": seen.path,
                "query": seen.query,
                "headers": seen.headers,
                "body_length": seen.body_length,
                "body_sha256": seen.body_sha256,
            }
        ).encode()

        def reply() -> None:
            if request.finished or request._disconnected:
                return
            request.setHeader(b"content-type", b"application/json")
            request.setHeader(b"content-length", str(len(answer)).encode())
            request.write(answer)
            request.finish()

        self._later(float(args.get("ms", "0")) / 1000, reply)
        return NOT_DONE_YET

    def do_load(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """A load route: after ``ms``, its health answer says ``loaded``, then it answers."""
        self._later(float(args.get("ms", "0")) / 1000, self._reports_loaded, True)
        return self.do_echo(request, args, body)

    def do_unload(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """An unload route: after ``ms``, its health answer says not ``loaded``; it answers."""
        self._later(float(args.get("ms", "0")) / 1000, self._reports_loaded, False)
        return self.do_echo(request, args, body)

    def _reports_loaded(self, loaded: bool) -> None:
        self.health_answer = {**self.health_answer, "loaded": loaded}

    def do_status(self, request: Request, args: dict[str, str], body: bytes) -> bytes:
        """A fixed error answer with repeated headers."""
        request.setResponseCode(int(args.get("code", "418")), b"Custom Phrase")
        request.setHeader(b"content-type", b"text/plain; charset=utf-8")
        request.responseHeaders.setRawHeaders(b"set-cookie", [b"a=1", b"b=2"])
        request.setHeader(b"x-upstream", self.name.encode())
        return b"upstream says no\n"

    def do_redirect(self, request: Request, args: dict[str, str], body: bytes) -> bytes:
        request.setResponseCode(302)
        request.setHeader(b"location", b"http://127.0.0.1:1/elsewhere")
        return b"moved"

    def do_gzip(self, request: Request, args: dict[str, str], body: bytes) -> bytes:
        payload = gzip.compress(b'{"compressed": true}\n' * 50)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"content-encoding", b"gzip")
        request.setHeader(b"content-length", str(len(payload)).encode())
        return payload

    def do_hop(self, request: Request, args: dict[str, str], body: bytes) -> bytes:
        """Sends hop-by-hop headers the proxy must not relay."""
        request.setHeader(b"connection", b"x-private")
        request.setHeader(b"x-private", b"secret")
        request.setHeader(b"keep-alive", b"timeout=5")
        request.setHeader(b"proxy-authenticate", b"Basic")
        request.setHeader(b"x-end-to-end", b"kept")
        return b"ok"

    def do_stream(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """NDJSON, ``lines`` lines ``interval`` seconds apart, chunked."""
        lines = int(args.get("lines", "10"))
        interval = float(args.get("interval", "0.2"))
        request.setHeader(b"content-type", b"application/x-ndjson")

        def send(n: int) -> None:
            if request._disconnected:
                return
            if n == lines:
                request.write(b'{"done": true}\n')
                request.finish()
                return
            request.write(json.dumps({"n": n, "sent": time.time()}).encode() + b"\n")
            self.lines_sent += 1
            self._later(interval, send, n + 1)

        send(0)
        return NOT_DONE_YET

    def do_die(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """Promises 1000 bytes, sends 100, then the connection dies."""
        chunked = args.get("chunked") == "1"
        if not chunked:
            request.setHeader(b"content-length", b"1000")
        request.write(b"x" * 100)

        def die() -> None:
            request.transport.abortConnection()

        self._later(0.05, die)
        return NOT_DONE_YET

    def do_close(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """Takes the request, then drops the connection without a word."""
        request.transport.abortConnection()
        return NOT_DONE_YET

    def do_download(self, request: Request, args: dict[str, str], body: bytes) -> int:
        """``mib`` MiB of zeros, written as the client's socket takes them."""
        remaining = int(args.get("mib", "1")) * 1024 * 1024
        chunk = b"\0" * 65536
        request.setHeader(b"content-length", str(remaining).encode())
        request.setHeader(b"content-type", b"application/octet-stream")

        class Producer:
            paused = False

            def resumeProducing(self) -> None:
                nonlocal remaining
                self.paused = False
                while remaining > 0 and not self.paused and not request._disconnected:
                    request.write(chunk)
                    remaining -= len(chunk)
                if remaining <= 0 and not request.finished and not request._disconnected:
                    request.unregisterProducer()
                    request.finish()

            def pauseProducing(self) -> None:
                self.paused = True

            def stopProducing(self) -> None:
                self.paused = True

        producer = Producer()
        request.registerProducer(producer, True)
        producer.resumeProducing()
        return NOT_DONE_YET

    def _later(self, delay: float, call: Any, *args: Any) -> Deferred[None]:
        d = deferLater(self.reactor, delay, call, *args)
        d.addErrback(lambda f: None)
        return d


def listen(upstream: ScriptedUpstream, reactor: Any = global_reactor) -> Any:
    """Listen on an ephemeral loopback port; returns the listening port."""
    site = Site(upstream)
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]
    return reactor.listenTCP(0, site, interface="127.0.0.1")
