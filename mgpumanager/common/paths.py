"""
Request paths as a consumer will understand them, and as the route table
matches them.

A passthrough forwards the client's path byte for byte (ComfyUI puts ``%2F``
inside a segment, and re-encoding it would change what the server reads), but
whether the request is a GPU job is decided on a normalised copy: otherwise
``/api//generate``, ``/api/./generate`` or ``/api/%67enerate`` would reach the
server as a generate call without ever waiting for the GPU.
"""

from __future__ import annotations

import functools
from urllib.parse import quote_from_bytes, unquote, unquote_to_bytes


@functools.lru_cache(maxsize=1024)
def normalise(raw: bytes) -> str:
    """
    The path a server most likely resolves ``raw`` to: percent-decoded once,
    ``//`` collapsed, ``.`` and ``..`` segments removed; always starting with
    ``/``.  Bytes that are not UTF-8 are kept as replacement characters, which
    match no route.  Kept for the paths last asked (every job asks).
    """
    decoded = unquote(raw.decode("latin-1"), encoding="utf-8", errors="replace")
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    trailing = decoded.endswith("/") and bool(segments)
    return "/" + "/".join(segments) + ("/" if trailing else "")


def under(path: str, prefix: str) -> bool:
    """Whether ``path`` is ``prefix`` or below it, matching at a ``/`` boundary."""
    prefix = prefix.rstrip("/")
    return path == prefix or path.startswith(prefix + "/") or prefix == ""


def routing_segments(raw_path: bytes) -> list[bytes]:
    """
    The path's segments as matching sees them, always UTF-8: each
    percent-decoded, unless decoding would make a ``/`` (a new segment), a
    control character or bytes that are not UTF-8.
    """
    return [_matched_segment(raw) for raw in raw_path[1:].split(b"/")]


#: Bytes a decoded segment may not hold: a new segment, or a line break no
#: pattern matches.
_CONTROL_OR_SLASH = frozenset(b"/\x7f" + bytes(range(32)))


def _matched_segment(raw: bytes) -> bytes:
    if b"%" in raw:
        decoded = unquote_to_bytes(raw)
        if _CONTROL_OR_SLASH.isdisjoint(decoded) and is_utf8(decoded):
            return decoded
    if is_utf8(raw):
        return raw
    # Bytes no route can name: spelled in ASCII, so that matching fails cleanly.
    return quote_from_bytes(raw, safe="%").encode("ascii")


def is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
