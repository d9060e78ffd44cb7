"""
A simulated OpenAI-style speech server, such as Kokoro-FastAPI behind a small
``http.server`` front: ``POST /v1/audio/speech`` answers audio bytes.

It speaks HTTP/1.0 and closes the connection after every answer, exactly as Python's
``http.server`` does, so that a client (the daemon) that reuses connections blindly
is caught.  Like mvoice it has explicit load and unload routes; a speech request
made while unloaded loads the model first, as a server that loads lazily does.
"""

from __future__ import annotations

import platform
from typing import Any

from klein import Klein
from twisted.web.server import Request, Site

from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.server import QuietSite, Refusal, SimServer
from mgpumanager.simulate.voice import fake_wav

_SERVER = f"BaseHTTP/0.6 Python/{platform.python_version()}".encode("ascii")

#: What the stand-in encodes: WAV, and PCM as the raw samples inside it.
_FORMATS = {"wav": b"audio/wav", "pcm": b"audio/pcm"}


class Http10Request(Request):
    """A request answered the way Python's ``http.server`` answers: HTTP/1.0, then close."""

    def process(self) -> None:
        self.clientproto = b"HTTP/1.0"
        self.channel.persistent = False
        super().process()

    def write(self, data: bytes) -> None:
        if not self.startedWriting:
            self.setHeader(b"Server", _SERVER)
            self.setHeader(b"Connection", b"close")
        super().write(data)


class SimSpeech(SimServer):
    """
    A TTS server with OpenAI's speech API.

    :param voices: the voices it knows; any other is a 400.
    :param models: the model ids ``/v1/models`` lists and requests may name.
    """

    app = Klein()

    def __init__(
        self,
        card: CardMemory,
        *,
        name: str = "speech",
        voices: tuple[str, ...] = ("af_heart", "alloy"),
        models: tuple[str, ...] = ("kokoro", "tts-1"),
        **options: Any,
    ) -> None:
        options.setdefault("model_mib", 800)
        super().__init__(card, name=name, **options)
        self.voices = voices
        self.models = models

    def site(self) -> Site:
        site = QuietSite(self.resource(), parsePOSTFormSubmission=False)
        site.requestFactory = Http10Request
        return site

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        return self.json(request, {"status": "healthy", **self.health_fields()})

    @app.route("/v1/models", methods=["GET"])
    def list_models(self, request: Request) -> bytes:
        data = [
            {"id": model, "object": "model", "created": 0, "owned_by": self.name}
            for model in self.models
        ]
        return self.json(request, {"object": "list", "data": data})

    @app.route("/admin/load", methods=["POST"])
    async def admin_load(self, request: Request) -> bytes:
        return await self.load_answer(request)

    @app.route("/admin/unload", methods=["POST"])
    def admin_unload(self, request: Request) -> bytes:
        return self.unload_answer(request)

    @app.route("/v1/audio/speech", methods=["POST"])
    async def speech(self, request: Request) -> bytes:
        async def job() -> bytes:
            body = self.json_body(request)
            text, voice = body.get("input"), body.get("voice", self.voices[0])
            if not isinstance(text, str) or not text:
                raise Refusal(400, "'input' must be a non-empty string")
            if body.get("model", self.models[0]) not in self.models:
                raise Refusal(400, f"unknown model {body.get('model')!r}")
            if voice not in self.voices:
                raise Refusal(400, f"unknown voice {voice!r}")
            # Other formats (mp3, opus, ...) get WAV: the one encoder this server has.
            response_format = str(body.get("response_format", "wav"))
            await self.model.load()
            await self.work()
            audio = fake_wav(text)
            if response_format == "pcm":
                audio = audio[44:]
            request.setHeader(b"Content-Type", _FORMATS.get(response_format, b"audio/wav"))
            request.setHeader(b"Content-Length", b"%d" % len(audio))
            return audio

        return await self.run_job(request, job)
