"""
``mgpumanager yield`` and ``mgpumanager resume``: give a card to a guest (a game,
a training run) and take it back.

``yield`` asks the daemon to hold the card for the guest and waits for its answer,
which comes only once the card is free: after the running job on it ends and every
consumer on it is unloaded.  That can take as long as a job, so the wait is long
(:data:`YIELD_WAIT_SECONDS`); the answer says how much memory the guest now has.
``resume`` ends the yield, and the jobs waiting for the card start.

Exit status as every command's: 0 done, 1 the daemon could not be reached or
answered an error (its message printed), 2 a usage error.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import urllib.error
import urllib.request
from typing import Any, TextIO

from mgpumanager.app.cli_daemon import DEFAULT_URL, DaemonError, error_message, read_token

#: How long ``yield`` waits for the daemon's answer: the running job must end first.
YIELD_WAIT_SECONDS = 3600.0
#: How long ``resume`` waits: the daemon answers at once.
RESUME_WAIT_SECONDS = 10.0

_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s?)?")


def duration(text: str) -> int:
    """
    Seconds from ``90``, ``90s``, ``15m``, ``2h`` or ``1h30m``.

    :raises argparse.ArgumentTypeError: for anything else, or no time at all.
    """
    match = _DURATION.fullmatch(text.strip().lower())
    if not text.strip() or match is None:
        raise argparse.ArgumentTypeError(
            f"not a duration: {text!r} (such as 90, 90s, 15m, 2h, 1h30m)"
        )
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise argparse.ArgumentTypeError(f"a yield lasts longer than {text!r}")
    return total


def _card(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"not a card index: {text!r}")
    return int(text)


def add_commands(commands: Any) -> None:
    """Register ``yield`` and ``resume`` on the ``mgpumanager`` command's subparsers."""
    give = commands.add_parser(
        "yield", help="hold a card for a guest; waits until it is free"
    )
    give.add_argument("--for", dest="seconds", type=duration, metavar="DURATION",
                      help="end the yield by itself after this long (90, 15m, 2h, 1h30m); "
                      "default: until resume")
    give.add_argument("--reason", help="why, shown in the daemon's status")
    take = commands.add_parser("resume", help="end a card's yield: its jobs start again")
    for command, run in ((give, yield_card), (take, resume_card)):
        command.add_argument("--card", type=_card, default=0, metavar="N",
                             help="the card's index (default 0)")
        command.add_argument("--url", default=DEFAULT_URL, help=f"default {DEFAULT_URL}")
        command.add_argument("--token-file", help="a file holding the daemon's bearer token")
        command.set_defaults(run=run)


def yield_card(args: argparse.Namespace, out: TextIO) -> int:
    """``mgpumanager yield``: ask, wait, print the card's free memory."""
    body: dict[str, Any] = {}
    if args.seconds is not None:
        body["seconds"] = args.seconds
    if args.reason is not None:
        body["reason"] = args.reason
    print(f"waiting for card {args.card}: the job on it ends, its consumers unload ...",
          file=sys.stderr, flush=True)
    try:
        answer = _send(args, "POST", body, YIELD_WAIT_SECONDS)
    except DaemonError as e:
        print(f"mgpumanager: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"mgpumanager: stopped waiting; the daemon may still yield card {args.card} "
              f"(mgpumanager resume --card {args.card} takes it back)", file=sys.stderr)
        return 1
    print(render_yielded(answer, args.card), file=out)
    return 0


def resume_card(args: argparse.Namespace, out: TextIO) -> int:
    """``mgpumanager resume``: end the card's yield."""
    try:
        _send(args, "DELETE", None, RESUME_WAIT_SECONDS)
    except DaemonError as e:
        print(f"mgpumanager: {e}", file=sys.stderr)
        return 1
    print(f"card {args.card} resumed: jobs that need it may start", file=out)
    return 0


def render_yielded(answer: Any, card: int) -> str:
    """What ``yield`` prints from ``{"card", "yielded", "free_mib"}``."""
    answer = answer if isinstance(answer, dict) else {}
    free = answer.get("free_mib")
    line = f"card {answer.get('card', card)} yielded: " + (
        f"{free} MiB free" if isinstance(free, int) else "free memory unknown"
    )
    yielded = answer.get("yielded")
    if isinstance(yielded, dict):
        details = [f"reason {yielded['reason']}"] if yielded.get("reason") else []
        details.append(f"until {yielded.get('until') or 'resume'}")
        line += f" ({', '.join(details)})"
    return line


def _send(args: argparse.Namespace, method: str, body: object, timeout: float) -> Any:
    """
    The daemon's JSON answer to ``method`` on the card's yield (``None`` for an
    empty one); an error envelope becomes its message.
    """
    path = f"/v1/gpus/{args.card}/yield"
    url = args.url.rstrip("/") + path
    data = None if body is None else json.dumps(body).encode("utf-8")
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Accept", "application/json")
    if data is not None:
        request.add_header("Content-Type", "application/json")
    token = read_token(args.token_file)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            raw = answer.read()
    except urllib.error.HTTPError as e:
        raise DaemonError(error_message(e.code, e.read())) from None
    except TimeoutError:
        raise DaemonError(f"{url} did not answer within {timeout:.0f} s") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise DaemonError(f"cannot reach {args.url}: {reason}") from None
    if not raw.strip():
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise DaemonError(f"{url} did not answer JSON") from None
