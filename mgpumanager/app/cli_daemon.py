"""
Asking a running daemon from the command line: where it listens by default,
the bearer token, and what its error answers say.  Shared by every command
that talks to the daemon (``status``, ``plan``, ``yield``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8770"
TIMEOUT_SECONDS = 10.0


class DaemonError(Exception):
    """The daemon could not be asked, or answered with an error; ``str()`` says which."""


def read_token(token_file: str | None) -> str | None:
    """The bearer token in ``token_file`` (None: no token is sent)."""
    if token_file is None:
        return None
    try:
        with open(token_file, encoding="utf-8") as f:
            return f.read().strip()
    except OSError as e:
        raise DaemonError(f"cannot read the token file: {e}") from None


def get_json(base_url: str, path: str, token: str | None) -> Any:
    """The JSON document at ``path``; an error envelope becomes its message."""
    request = urllib.request.Request(base_url.rstrip("/") + path)
    request.add_header("Accept", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as answer:
            return json.loads(answer.read())
    except urllib.error.HTTPError as e:
        raise DaemonError(error_message(e.code, e.read())) from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DaemonError(f"cannot reach {base_url}: {reason}") from None
    except ValueError:
        raise DaemonError(f"{base_url}{path} did not answer JSON") from None


def error_message(status: int, body: bytes) -> str:
    """The envelope's message (either shape the daemon uses), else the status."""
    try:
        envelope = json.loads(body)
    except ValueError:
        return f"the daemon answered {status}"
    error = envelope.get("error") if isinstance(envelope, dict) else None
    if isinstance(error, dict):  # OpenAI's shape
        return f"{status} {error.get('code')}: {error.get('message')}"
    return f"{status} {error}: {envelope.get('message')}"
