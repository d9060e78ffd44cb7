"""
The ``mgpumanager`` command: ``check`` on real and broken files, ``status``
and ``plan`` against a loopback server answering like the daemon.  The command
blocks, so it runs in a thread while the reactor serves.
"""

from __future__ import annotations

import io
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import reactor
from twisted.internet.threads import deferToThread
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

from mgpumanager.app.cli import main, render_status
from mgpumanager.config.parsing import load_config
from tests.e2e.test_page_browser import on_two_cards, status_document, with_image_job

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((REPO / "config").glob("*.yaml"))
TOKEN = "cli-token-0123456789"

PLAN = {
    "kind": "image", "target": "comfyui", "skip_make_room": None,
    "would_evict": ["mvoice"], "would_load": True, "load_by": "cold start on the first request",
    "steps": [
        {"fit": {"fits": False, "why": "NVML free 3884 MiB vs 9000 + 256 MiB cushion"},
         "candidates": [{"name": "mvoice", "reason": "eligible"},
                        {"name": "ollama", "reason": "manages its own VRAM"}],
         "victim": "mvoice"},
        {"fit": {"fits": True, "why": "NVML free 6884 MiB vs 9000 + 256 MiB cushion"},
         "candidates": [], "victim": None},
    ],
}


def run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    return main(list(argv), out), out.getvalue()


async def run_in_thread(*argv: str) -> tuple[int, str]:
    result: tuple[int, str] = await deferToThread(run, *argv)
    return result


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_check_accepts_every_example_and_summarises_it(example: Path) -> None:
    code, out = run("check", str(example))
    config = load_config(example)
    assert code == 0
    assert f"listen: {config.listen}" in out
    for name, consumer in config.consumers.items():
        assert name in out and consumer.url in out
    for kind, name in config.routing.items():
        assert f"{kind} -> {name}" in out


def test_check_a_broken_file_is_one_line_and_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO / "config" / "consumers.yaml").read_text().replace(
        "vram_resident_mib", "vram_resident_mb", 1))
    code, out = run("check", str(broken))
    err = capsys.readouterr().err
    assert code == 2 and out == ""
    assert err.count("\n") == 1
    assert str(broken) in err and "did you mean 'vram_resident_mib'" in err


def test_a_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["plan"])
    assert exited.value.code == 2
    assert "KIND" in capsys.readouterr().err


class DaemonAnswers(Resource):
    """Answers ``/v1/status`` and ``/v1/plan/<kind>`` as the daemon does, token-checked."""

    isLeaf = True

    def __init__(self, status: dict[str, Any]) -> None:
        super().__init__()
        self.status = status

    def render_GET(self, request: Request) -> bytes:
        request.setHeader(b"content-type", b"application/json")
        if request.getHeader(b"authorization") != f"Bearer {TOKEN}".encode():
            request.setResponseCode(401)
            return b'{"error": "unauthorized", "message": "a bearer token is required"}'
        if request.path == b"/v1/status":
            return json.dumps(self.status).encode()
        if request.path == b"/v1/plan/image":
            return json.dumps(PLAN).encode()
        request.setResponseCode(501)
        return json.dumps({"error": "no_consumer", "message": "no consumer serves "
                           + request.path.decode().rsplit("/", 1)[-1]}).encode()


@pytest_twisted.async_yield_fixture
async def daemon_url() -> AsyncIterator[str]:
    site = Site(DaemonAnswers(with_image_job(status_document())))
    port = reactor.listenTCP(0, site, interface="127.0.0.1")
    yield f"http://127.0.0.1:{port.getHost().port}"
    await port.stopListening()


@pytest.fixture
def token_file(tmp_path: Path) -> str:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return str(path)


@pytest_twisted.ensureDeferred
async def test_status_prints_the_card_consumers_running_job_and_queue(
    daemon_url: str, token_file: str
) -> None:
    code, out = await run_in_thread("status", "--url", daemon_url, "--token-file", token_file)
    assert code == 0
    assert "total 16384 MiB" in out and "free 3884 MiB" in out
    lines = out.splitlines()
    (comfyui,) = [line for line in lines if line.startswith("comfyui ")]
    assert comfyui.split()[:4] == ["comfyui", "healthy", "resident", "9000"]
    (whisper,) = [line for line in lines if line.startswith("whisper ")]
    assert "unhealthy" in whisper and "connection refused" in whisper
    assert "running: comfyui image (completing" in out
    (waiting,) = [line for line in lines if line.startswith("1 ")]
    assert waiting.split() == ["1", "mvoice", "tts", "interactive", "1800", "ms", "41", "s"]


@pytest_twisted.ensureDeferred
async def test_plan_prints_what_would_be_evicted_and_why(
    daemon_url: str, token_file: str
) -> None:
    code, out = await run_in_thread(
        "plan", "image", "--url", daemon_url, "--token-file", token_file
    )
    assert code == 0
    assert "would evict: mvoice" in out
    assert "NVML free 3884 MiB vs 9000 + 256 MiB cushion -> does not fit; evict mvoice" in out
    assert "ollama: manages its own VRAM" in out
    assert "would load: comfyui (cold start on the first request)" in out


@pytest_twisted.ensureDeferred
async def test_an_error_envelope_exits_1_with_its_message(
    daemon_url: str, token_file: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out = await run_in_thread("plan", "tts", "--url", daemon_url, "--token-file", token_file)
    assert (code, out) == (1, "")
    assert "501 no_consumer: no consumer serves tts" in capsys.readouterr().err
    code, _ = await run_in_thread("status", "--url", daemon_url)
    assert code == 1
    assert "401 unauthorized: a bearer token is required" in capsys.readouterr().err


def test_a_closed_port_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    code, out = run("status", "--url", f"http://127.0.0.1:{closed}")
    assert (code, out) == (1, "")
    assert f"cannot reach http://127.0.0.1:{closed}" in capsys.readouterr().err


def test_status_prints_a_line_per_card_and_the_cards_of_jobs_and_consumers() -> None:
    out = render_status(on_two_cards(with_image_job(status_document())))
    lines = out.splitlines()
    assert lines[0] == (
        "card 0: Stand-in GPU  total 16384 MiB  used 6500 MiB  free 9884 MiB  reserved 1024 MiB")
    assert lines[1] == ("card 1: Stand-in GPU  total 16384 MiB  used 9000 MiB  free 7384 MiB  "
                        "reserved 1024 MiB  running job job-7")
    (comfyui,) = [line for line in lines if line.startswith("comfyui ")]
    assert comfyui.split()[:6] == ["comfyui", "healthy", "resident", "9000", "MiB", "1"]
    assert "running: comfyui image (completing, since 2026-12-01T10:00:02.000Z) on card 1" in out
    (waiting,) = [line for line in lines if line.startswith("1 ")]
    assert waiting.split()[-1] == "0", "the waiting job's card"


def test_status_of_one_card_prints_the_card_as_before() -> None:
    document = on_two_cards(with_image_job(status_document()))
    document["gpus"] = document["gpus"][:1]
    out = render_status(document)
    assert out.splitlines()[0].startswith("card 0: Stand-in GPU  total 16384 MiB")
    assert "running: comfyui image (completing, since 2026-12-01T10:00:02.000Z)\n" in out
    assert " cards" not in out.splitlines()[2], "no cards column for one card"
