"""
A simulated mvoice: TTS and STT that load their model only when told to.
"""

from __future__ import annotations

import os
import struct
import uuid
from typing import Any

from klein import Klein
from twisted.web.server import Request

from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.server import Refusal, SimServer

_SAMPLE_RATE = 16000


def body_size(request: Request) -> int:
    """The size of the request body twisted.web buffered, without reading it."""
    content = request.content
    if content is None:
        return 0
    size = content.seek(0, os.SEEK_END)
    content.seek(0)
    return int(size)


def transcript(size: int) -> str:
    """What the simulated STT servers "hear" in ``size`` bytes of audio."""
    return f"simulated transcript of {size} bytes"


def fake_wav(text: str) -> bytes:
    """
    A valid, silent 16 kHz mono WAV whose length grows with ``text``, so that bigger
    inputs give bigger answers (0.02 s per character, 0.1 s to 10 s).
    """
    seconds = min(max(len(text) * 0.02, 0.1), 10.0)
    data = bytes(2 * int(_SAMPLE_RATE * seconds))
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, _SAMPLE_RATE, 2 * _SAMPLE_RATE, 2, 16)
    header += b"data" + struct.pack("<I", len(data))
    return header + data


class SimVoice(SimServer):
    """
    A TTS + STT server that loads its model only when told to, like mvoice.

    :param audio_dir: where synthesized files are written and served from.
    """

    app = Klein()

    def __init__(
        self, card: CardMemory, *, audio_dir: str, name: str = "mvoice", **options: Any
    ) -> None:
        options.setdefault("model_mib", 3000)
        super().__init__(card, name=name, **options)
        self.audio_dir = audio_dir
        os.makedirs(audio_dir, exist_ok=True)

    @app.route("/api/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return self.json(request, {"status": "ok", **self.health_fields()})

    @app.route("/api/admin/load", methods=["POST"])
    async def admin_load(self, request: Request) -> bytes:
        return await self.load_answer(request)

    @app.route("/api/admin/unload", methods=["POST"])
    def admin_unload(self, request: Request) -> bytes:
        return self.unload_answer(request)

    @app.route("/api/synthesize", methods=["POST"])
    async def synthesize(self, request: Request) -> bytes:
        async def job() -> bytes:
            self._require_loaded()
            text = str(self.json_body(request).get("text", ""))
            await self.work()
            audio = fake_wav(text)
            name = self._save_audio(audio)
            request.setHeader(b"Content-Type", b"audio/wav")
            request.setHeader(b"X-Audio-File", name.encode("ascii"))
            request.setHeader(b"Content-Length", str(len(audio)).encode("ascii"))
            return audio

        return await self.run_job(request, job)

    @app.route("/api/transcribe", methods=["POST"])
    async def transcribe(self, request: Request) -> bytes:
        async def job() -> bytes:
            self._require_loaded()
            await self.work()
            return self.json(request, {"text": transcript(body_size(request))})

        return await self.run_job(request, job)

    @app.route("/api/audio/<name>", methods=["GET"])
    def audio(self, request: Request, name: str) -> bytes:
        path = os.path.join(self.audio_dir, name)
        safe = name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
        if not safe or not os.path.isfile(path):
            return self.error(request, 404, f"no audio file {name!r}")
        request.setHeader(b"Content-Type", b"audio/wav")
        with open(path, "rb") as f:
            return f.read()

    def _save_audio(self, audio: bytes) -> str:
        # Real TTS servers keep their output for a later GET; a few KiB, so a
        # blocking write is fine even on the reactor thread.
        name = f"{uuid.uuid4().hex}.wav"
        with open(os.path.join(self.audio_dir, name), "wb") as f:
            f.write(audio)
        return name

    def _require_loaded(self) -> None:
        if not self.model.loaded:
            raise Refusal(503, "model not loaded")
