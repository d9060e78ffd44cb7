"""
A simulated whisper.cpp server (``/inference``) whose lifetime is a systemd unit,
with the OpenAI audio routes (``/v1/audio/transcriptions`` and ``translations``)
that OpenAI-style STT servers offer beside it.
"""

from __future__ import annotations

import json
from typing import Any

from klein import Klein
from twisted.logger import Logger
from twisted.web.server import Request

from mgpumanager.simulate.card import CudaOutOfMemory
from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.server import Refusal, SimServer
from mgpumanager.simulate.voice import body_size, transcript

log = Logger()


class SimWhisper(SimServer):
    """
    A whisper.cpp-style STT server whose lifetime is a systemd unit.

    :param preload: load at :meth:`start` (the usual ``-m model`` start-up) rather
        than on the first request.

    :meth:`start` and :meth:`stop` stand for ``systemctl start/stop``; while stopped
    every public route answers 503, as a probe of a dead unit fails.  The
    ``/_sim/unit/*`` routes let a stand-in ``systemctl`` in another process drive it.
    """

    app = Klein()

    def __init__(
        self,
        card: CardMemory,
        *,
        name: str = "whisper",
        preload: bool = True,
        unit: str = "whisper-server.service",
        **options: Any,
    ) -> None:
        options.setdefault("model_mib", 1500)
        super().__init__(card, name=name, **options)
        self.preload = preload
        self.unit = unit
        self.running = False
        self.starts = 0
        self.stops = 0

    async def start(self) -> None:
        """Start the unit; with ``preload`` this returns once the model is loaded."""
        if not self.running:
            self.running = True
            self.starts += 1
            log.info("{unit} started", unit=self.unit)
        if self.preload:
            await self.model.load()

    async def stop(self) -> None:
        """Stop the unit; returns once the process's memory is back on the card."""
        if self.running:
            self.running = False
            self.stops += 1
            log.info("{unit} stopped", unit=self.unit)
        await self.model.unload()

    @app.route("/health", methods=["GET"])
    def health(self, request: Request) -> bytes:
        if not self.running:
            return self.json(request, {"status": "error", "error": f"{self.unit} is stopped"}, 503)
        if self.model.loading:
            return self.json(request, {"status": "loading model"}, 503)
        return self.json(request, {"status": "ok", **self.health_fields()})

    @app.route("/inference", methods=["POST"])
    async def inference(self, request: Request) -> bytes:
        async def job() -> bytes:
            if not self.running:
                raise Refusal(503, f"{self.unit} is stopped")
            await self.model.load()
            await self.work()
            return self.json(request, {"text": transcript(body_size(request))})

        return await self.run_job(request, job)

    @app.route("/v1/audio/transcriptions", methods=["POST"])
    async def transcriptions(self, request: Request) -> bytes:
        return await self._openai_audio(request, "transcribe")

    @app.route("/v1/audio/translations", methods=["POST"])
    async def translations(self, request: Request) -> bytes:
        return await self._openai_audio(request, "translate")

    async def _openai_audio(self, request: Request, task: str) -> bytes:
        """OpenAI's audio upload: a form with ``file`` and ``model``."""

        async def job() -> bytes:
            if not self.running:
                raise Refusal(503, f"{self.unit} is stopped")
            form = self.form_body(request)
            try:
                upload = form.files.get("file")
                if upload is None or "model" not in form.fields:
                    raise Refusal(400, "the form needs a 'file' and a 'model'")
                await self.model.load()
                await self.work()
                text = transcript(upload.size)
            finally:
                form.close()
            return _audio_answer(request, form.fields.get("response_format", "json"), task, text)

        return await self.run_job(request, job)

    @app.route("/_sim/unit/<action>", methods=["POST", "GET"])
    async def unit_control(self, request: Request, action: str) -> bytes:
        try:
            if action == "start":
                await self.start()
            elif action == "stop":
                await self.stop()
            elif action != "status":
                return self.error(request, 404, f"unknown unit action {action!r}")
        except CudaOutOfMemory as e:
            return self.error(request, 500, str(e))
        return self.json(request, {"unit": self.unit, "active": self.running})


def _audio_answer(request: Request, response_format: str, task: str, text: str) -> bytes:
    """The transcript in the ``response_format`` OpenAI's API defines."""
    if response_format == "json":
        return SimServer.json(request, {"text": text})
    if response_format == "verbose_json":
        document = {
            "task": task,
            "language": "english",
            "duration": 1.0,
            "text": text,
            "segments": [{"id": 0, "start": 0.0, "end": 1.0, "text": text}],
        }
        return SimServer.json(request, document)
    if response_format in ("text", "srt", "vtt"):
        cue = "00:00:00,000 --> 00:00:01,000"
        body = {
            "text": text,
            "srt": f"1\n{cue}\n{text}\n",
            "vtt": f"WEBVTT\n\n{cue.replace(',', '.')}\n{text}\n",
        }[response_format]
        request.setHeader(b"Content-Type", b"text/plain; charset=utf-8")
        return body.encode("utf-8")
    raise Refusal(400, f"unsupported response_format {json.dumps(response_format)}")
