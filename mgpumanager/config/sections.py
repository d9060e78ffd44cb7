"""
Checks of single top-level values of ``consumers.yaml`` whose rules are their own:
the lifecycle's command, the audio prefix, the queue depth, the token file.
"""

from __future__ import annotations

from pathlib import Path

from mgpumanager.config.reader import Reader


def command(read: Reader, value: object, key_path: str) -> tuple[str, ...]:
    command = read.names(value.split() if isinstance(value, str) else value, key_path)
    if not command:
        raise read.fail(key_path, "must name a command")
    return command


def audio_prefix(read: Reader, value: object, key_path: str) -> str:
    prefix = read.text(value, key_path)
    segments = prefix[1:-1].split("/")
    clean = (
        prefix != "/"
        and prefix.startswith("/")
        and prefix.endswith("/")
        and all(
            segment not in ("", ".", "..")
            and all(c.isalnum() or c in "-_.~" for c in segment)
            for segment in segments
        )
    )
    if not clean:
        raise read.fail(
            key_path,
            f"must start and end with '/' and hold only plain path segments (got {prefix!r})",
        )
    return prefix


def queue_depth(read: Reader, value: object, key_path: str) -> int:
    depth = read.whole(value, key_path)
    if depth < 1:
        raise read.fail(key_path, f"must be at least 1 (got {depth})")
    return depth


def auth(read: Reader, value: object, key_path: str) -> bytes | None:
    table = read.mapping(value, key_path, ("token_file",))
    if not table:
        return None
    name = read.required(table, "token_file", key_path, read.text)
    path = Path(name)
    if not path.is_absolute():
        path = Path(read.source).parent / path
    try:
        token = path.read_bytes().strip()
    except OSError as e:
        raise read.fail(f"{key_path}.token_file", f"cannot read {name}: {e.strerror}") from None
    if len(token) < 16 or any(c <= 32 or c >= 127 for c in token):
        raise read.fail(
            f"{key_path}.token_file",
            "the token must be at least 16 printable characters, no spaces",
        )
    return token
