"""
``multipart/form-data`` read from a body stream, for the OpenAI-style audio uploads.

The body is read in chunks and every file part goes straight into a spooled temporary
file, so an upload of any size is held at most once (and on disk beyond a MiB).
Plain fields are small by nature and limited to 64 KiB each.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from email.message import Message
from typing import IO

import attrs

CHUNK = 64 * 1024
MAX_FIELD = 64 * 1024
MAX_HEADERS = 16 * 1024
_SPOOL_BYTES = 1024 * 1024


class MultipartError(ValueError):
    """The body is not the ``multipart/form-data`` its ``Content-Type`` announced."""


@attrs.frozen
class UploadedFile:
    """One file part; ``data`` is positioned at its start."""

    filename: str
    content_type: str
    size: int
    data: IO[bytes]


@attrs.frozen
class FormData:
    fields: dict[str, str]
    files: dict[str, UploadedFile]

    def close(self) -> None:
        for upload in self.files.values():
            upload.data.close()


def header_params(value: str) -> Message:
    """A header whose ``; key=value`` parameters ``get_param`` can read."""
    message = Message()
    message["content-type"] = value
    return message


def boundary_of(content_type: str | None) -> bytes:
    """
    :raises MultipartError: unless ``content_type`` is multipart/form-data with a boundary.
    """
    parsed = header_params(content_type or "")
    if parsed.get_content_type() != "multipart/form-data":
        raise MultipartError("the body must be multipart/form-data")
    boundary = parsed.get_param("boundary")
    if not isinstance(boundary, str) or not boundary:
        raise MultipartError("multipart/form-data without a boundary")
    return boundary.encode("latin-1")


def parse_form(stream: IO[bytes], boundary: bytes) -> FormData:
    """
    Parse a form from ``stream``, which is read once, front to back.

    :raises MultipartError: for a malformed or unterminated body.
    """
    reader = _Reader(stream)
    delimiter = b"\r\n--" + boundary
    reader.copy_until(delimiter, lambda _: None)
    fields: dict[str, str] = {}
    files: dict[str, UploadedFile] = {}
    while (after := reader.take(2)) == b"\r\n":
        name, filename, content_type = _part_headers(reader.read_until(b"\r\n\r\n"))
        if filename is None:
            collected: list[bytes] = []
            reader.copy_until(delimiter, collected.append, limit=MAX_FIELD)
            fields[name] = b"".join(collected).decode("utf-8", "replace")
            continue
        spool = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)
        size = reader.copy_until(delimiter, spool.write)
        spool.seek(0)
        files[name] = UploadedFile(filename, content_type, size, spool)  # type: ignore[arg-type]
    if after != b"--":
        raise MultipartError("malformed part delimiter")
    return FormData(fields, files)


def _part_headers(block: bytes) -> tuple[str, str | None, str]:
    disposition, content_type = "", "application/octet-stream"
    for line in block.decode("utf-8", "replace").split("\r\n"):
        key, _, value = line.partition(":")
        if key.strip().lower() == "content-disposition":
            disposition = value.strip()
        elif key.strip().lower() == "content-type":
            content_type = value.strip()
    params = header_params(disposition)
    name = params.get_param("name")
    if not isinstance(name, str):
        raise MultipartError("a part without a name")
    filename = params.get_param("filename")
    return name, filename if isinstance(filename, str) else None, content_type


class _Reader:
    """A byte stream read in chunks, with a look-ahead buffer for delimiters."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        # The first delimiter has no CRLF before it: lend it one.
        self._buffer = b"\r\n"

    def _more(self) -> None:
        chunk = self._stream.read(CHUNK)
        if not chunk:
            raise MultipartError("the body ended inside the form")
        self._buffer += chunk

    def take(self, count: int) -> bytes:
        while len(self._buffer) < count:
            self._more()
        taken, self._buffer = self._buffer[:count], self._buffer[count:]
        return taken

    def read_until(self, marker: bytes) -> bytes:
        while (index := self._buffer.find(marker)) < 0:
            if len(self._buffer) > MAX_HEADERS:
                raise MultipartError("part headers too long")
            self._more()
        found, self._buffer = self._buffer[:index], self._buffer[index + len(marker) :]
        return found

    def copy_until(
        self, marker: bytes, write: Callable[[bytes], object], limit: int | None = None
    ) -> int:
        """Hand everything before ``marker`` to ``write``; return how many bytes."""
        copied = 0
        keep = len(marker) - 1
        while (index := self._buffer.find(marker)) < 0:
            if len(self._buffer) > keep:
                copied += len(self._buffer) - keep
                write(self._buffer[:-keep])
                self._buffer = self._buffer[-keep:]
            if limit is not None and copied > limit:
                raise MultipartError("form field too long")
            self._more()
        write(self._buffer[:index])
        self._buffer = self._buffer[index + len(marker) :]
        return copied + index
