"""
The benchmark's Python upstreams, one kind per process, on 127.0.0.1 only.

``stream``  POST: 20 NDJSON lines 50 ms apart, chunked (``?lines=&interval_ms=``).
``large``   POST ``?mode=down&bytes=N``: N bytes generated on the fly, never held whole;
            POST ``?mode=up``: the body is read, counted and dropped, the count answered.
``slow``    POST: answered only while the gate is open; ``POST /gate?open=1|0`` sets it.

Every kind answers ``GET /health`` at once. HTTP/1.1 with keep-alive, request bodies with
Content-Length or chunked.

    python bench/upstreams.py KIND PORT
"""

from __future__ import annotations

import asyncio
import json
import sys
from urllib.parse import parse_qs

BLOCK = b"x" * (1 << 20)
READ_SIZE = 1 << 20


class Request:
    def __init__(self, method: str, path: str, query: dict[str, list[str]],
                 headers: dict[str, str]) -> None:
        self.method = method
        self.path = path
        self.query = query
        self.headers = headers
        self.body_bytes = 0

    def param(self, name: str, default: int) -> int:
        values = self.query.get(name)
        return int(values[0]) if values else default

    @property
    def keep_alive(self) -> bool:
        return self.headers.get("connection", "").lower() != "close"


async def read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    path, _, query = target.partition("?")
    request = Request(method, path, parse_qs(query), headers)
    request.body_bytes = await consume_body(reader, headers)
    return request


async def consume_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> int:
    """Reads the request body, keeping nothing but its length."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        total = 0
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":
                    pass
                return total
            await skip(reader, size)
            await reader.readexactly(2)
            total += size
    length = int(headers.get("content-length", "0") or 0)
    await skip(reader, length)
    return length


async def skip(reader: asyncio.StreamReader, count: int) -> None:
    while count > 0:
        data = await reader.read(min(count, READ_SIZE))
        if not data:
            raise asyncio.IncompleteReadError(b"", count)
        count -= len(data)


def head(status: str, headers: dict[str, str]) -> bytes:
    lines = [f"HTTP/1.1 {status}", *(f"{name}: {value}" for name, value in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def answer_json(writer: asyncio.StreamWriter, value: object, status: str = "200 OK",
                      ) -> None:
    body = json.dumps(value).encode()
    writer.write(head(status, {"Content-Type": "application/json",
                               "Content-Length": str(len(body))}) + body)
    await writer.drain()


class Upstream:
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.gate = asyncio.Event()

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                request = await read_request(reader)
                if request is None:
                    break
                await self.dispatch(request, writer)
                if not request.keep_alive:
                    break
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def dispatch(self, request: Request, writer: asyncio.StreamWriter) -> None:
        if request.method == "GET" and request.path == "/health":
            await answer_json(writer, {"ok": True})
        elif request.method != "POST":
            await answer_json(writer, {"error": "method"}, "405 Method Not Allowed")
        elif self.kind == "stream":
            await self.stream(request, writer)
        elif self.kind == "large":
            await self.large(request, writer)
        elif self.kind == "slow":
            await self.slow(request, writer)
        else:
            await answer_json(writer, {"error": "kind"}, "500 Internal Server Error")

    async def stream(self, request: Request, writer: asyncio.StreamWriter) -> None:
        lines = request.param("lines", 20)
        interval = request.param("interval_ms", 50) / 1000
        writer.write(head("200 OK", {"Content-Type": "application/x-ndjson",
                                     "Transfer-Encoding": "chunked"}))
        loop = asyncio.get_running_loop()
        start = loop.time()
        for index in range(lines):
            if index:
                await asyncio.sleep(max(0.0, start + index * interval - loop.time()))
            line = json.dumps({"model": "bench", "response": f"tok{index}",
                               "done": False}).encode() + b"\n"
            writer.write(b"%x\r\n%s\r\n" % (len(line), line))
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    async def large(self, request: Request, writer: asyncio.StreamWriter) -> None:
        if request.query.get("mode", ["up"])[0] != "down":
            await answer_json(writer, {"received": request.body_bytes})
            return
        remaining = request.param("bytes", 200 << 20)
        writer.write(head("200 OK", {"Content-Type": "application/octet-stream",
                                     "Content-Length": str(remaining)}))
        view = memoryview(BLOCK)
        while remaining > 0:
            part = view[: min(remaining, len(BLOCK))]
            writer.write(part)
            remaining -= len(part)
            await writer.drain()

    async def slow(self, request: Request, writer: asyncio.StreamWriter) -> None:
        if request.path == "/gate":
            if request.param("open", 1):
                self.gate.set()
            else:
                self.gate.clear()
            await answer_json(writer, {"open": self.gate.is_set()})
            return
        await self.gate.wait()
        await answer_json(writer, {"ok": True})


async def main(kind: str, port: int) -> None:
    upstream = Upstream(kind)
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", port, limit=READ_SIZE,
                                        backlog=1024)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("stream", "large", "slow"):
        sys.exit(__doc__)
    try:
        asyncio.run(main(sys.argv[1], int(sys.argv[2])))
    except KeyboardInterrupt:
        pass
