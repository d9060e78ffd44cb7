"""
Request paths as a consumer will understand them.

A passthrough forwards the client's path byte for byte (ComfyUI puts ``%2F``
inside a segment, and re-encoding it would change what the server reads), but
whether the request is a GPU job is decided on a normalised copy: otherwise
``/api//generate``, ``/api/./generate`` or ``/api/%67enerate`` would reach the
server as a generate call without ever waiting for the GPU.
"""

from __future__ import annotations

from urllib.parse import unquote


def normalise(raw: bytes) -> str:
    """
    The path a server most likely resolves ``raw`` to: percent-decoded once,
    ``//`` collapsed, ``.`` and ``..`` segments removed; always starting with
    ``/``.  Bytes that are not UTF-8 are kept as replacement characters, which
    match no route.
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
