"""
The design card's bare prototype, run by the benchmark as a reference candidate:
a Klein route, one ``DeferredLock`` for the GPU, ``treq.request`` to the upstream and
the answer streamed back with ``treq.collect``.  No access log, metrics, guard, policy
or Server-Timing: it is the cost of the shape itself, against which the daemon's CPU
per request is reported as a ratio (the route-table issue's target).

    .venv/bin/python bench/prototype.py PORT KIND=URL [KIND=URL ...]
"""

from __future__ import annotations

import sys
from typing import Any

import treq
from klein import Klein
from twisted.internet import reactor
from twisted.internet.defer import DeferredLock
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH
from twisted.web.server import Request, Site

HOST = "127.0.0.1"


class Prototype:
    """``POST /v1/<kind>`` relayed to the kind's upstream URL, one job at a time."""

    app = Klein()

    def __init__(self, upstreams: dict[str, str]) -> None:
        self.upstreams = upstreams
        self.gpu = DeferredLock()

    @app.route("/v1/<kind>", methods=["POST"])
    async def job(self, request: Request, kind: str) -> bytes | None:
        url = self.upstreams.get(kind)
        if url is None:
            request.setResponseCode(404)
            return b'{"error":"no such kind"}'
        _, has_query, query = request.uri.partition(b"?")
        if has_query:
            url += "?" + query.decode("ascii")
        await self.gpu.acquire()
        try:
            content_type = request.getHeader(b"content-type") or b"application/json"
            response: Any = await treq.request(
                "POST", url, data=request.content,
                headers=Headers({b"content-type": [content_type]}))
            request.setResponseCode(response.code)
            answer_type = response.headers.getRawHeaders(b"content-type")
            if answer_type:
                request.responseHeaders.setRawHeaders(b"content-type", answer_type)
            if response.length is not UNKNOWN_LENGTH:
                request.setHeader(b"content-length", b"%d" % response.length)
            await treq.collect(response, request.write)
        finally:
            self.gpu.release()
        return None


class QuietSite(Site):
    """A site without twisted.web's access log, which the prototype never had."""

    def log(self, request: Request) -> None:  # type: ignore[override]
        pass


def main(argv: list[str]) -> None:
    port = int(argv[0])
    upstreams = dict(pair.split("=", 1) for pair in argv[1:])
    site = QuietSite(Prototype(upstreams).app.resource())
    reactor.listenTCP(port, site, interface=HOST)  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main(sys.argv[1:])
