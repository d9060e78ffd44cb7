"""
The four simulated inference servers, one per kind of real server the daemon fronts.

Each copies the HTTP surface and, more to the point, the memory habits of the real one:

* :class:`SimVoice` (like mvoice) loads only when told to (``/api/admin/load``);
* :class:`SimOllama` loads on demand and unloads itself after ``keep_alive_seconds``;
* :class:`SimComfy` loads lazily on the first prompt and frees on ``/api/free``;
* :class:`SimWhisper` is loaded while its systemd unit runs (``start``/``stop``).

None of them knows about the others: that is why, sent a mixed workload directly, they
run out of memory on the shared card.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from typing import Any

from klein import Klein
from twisted.internet.interfaces import IDelayedCall
from twisted.logger import Logger
from twisted.web.server import Request

from mgpumanager.simulate.card import CudaOutOfMemory, SimulatedCard
from mgpumanager.simulate.server import Refusal, SimServer

log = Logger()

_MIB = 1024 * 1024
_SAMPLE_RATE = 16000


def _number(body: dict[str, Any], key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise Refusal(400, f"{key} must be a non-negative number")
    return float(value)


def body_size(request: Request) -> int:
    """The size of the request body twisted.web buffered, without reading it."""
    content = request.content
    if content is None:
        return 0
    size = content.seek(0, os.SEEK_END)
    content.seek(0)
    return int(size)


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
        self, card: SimulatedCard, *, audio_dir: str, name: str = "mvoice", **options: Any
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
        try:
            await self.model.load()
        except CudaOutOfMemory as e:
            self.oom_errors += 1
            return self.error(request, 500, str(e))
        return self.json(request, {"status": "loaded", **self.health_fields()})

    @app.route("/api/admin/unload", methods=["POST"])
    def admin_unload(self, request: Request) -> bytes:
        # Answers at once; the memory follows unload_seconds later.
        self.model.unload()
        return self.json(request, {"status": "unloaded", **self.health_fields()})

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
            size = body_size(request)
            return self.json(request, {"text": f"simulated transcript of {size} bytes"})

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


class SimOllama(SimServer):
    """
    An LLM server that runs its own model memory, like Ollama: it loads on the first
    request and unloads itself ``keep_alive_seconds`` after the last one.

    :param num_lines: default number of token lines a generation streams.
    :param interval: default gap before each token line.

    A request's JSON may override ``num_lines``, ``interval`` and ``keep_alive``
    (seconds; 0 unloads right after), and ask for ``"stream": false``.
    """

    app = Klein()

    def __init__(
        self,
        card: SimulatedCard,
        *,
        name: str = "ollama",
        keep_alive_seconds: float = 300.0,
        num_lines: int = 20,
        interval: float = 0.05,
        model_name: str = "sim-llm:7b",
        **options: Any,
    ) -> None:
        options.setdefault("model_mib", 6000)
        options.setdefault("work_seconds", 0.0)
        super().__init__(card, name=name, **options)
        self.model.offload_to_cpu = True
        self.keep_alive_seconds = keep_alive_seconds
        self.num_lines = num_lines
        self.interval = interval
        self.model_name = model_name
        self._expiry: IDelayedCall | None = None

    @app.route("/api/version", methods=["GET"])
    def version(self, request: Request) -> bytes:
        return self.json(request, {"version": "0.0.0-sim"})

    @app.route("/api/ps", methods=["GET"])
    def ps(self, request: Request) -> bytes:
        models = []
        if self.model.loaded:
            models.append({"name": self.model_name, "size_vram": self.model.model_mib * _MIB})
        return self.json(request, {"models": models})

    @app.route("/api/generate", methods=["POST"])
    async def generate(self, request: Request) -> bytes:
        async def job() -> bytes:
            body = self.json_body(request)
            lines = int(_number(body, "num_lines", self.num_lines))
            interval = _number(body, "interval", self.interval)
            keep_alive = _number(body, "keep_alive", self.keep_alive_seconds)
            model = str(body.get("model", self.model_name))
            self._cancel_expiry()
            try:
                await self.model.load()
                await self.work()
                if body.get("stream", True) is False:
                    await self.work(lines * interval)
                    text = "".join(f"tok{i}" for i in range(lines))
                    return self.json(request, {"model": model, "response": text, "done": True})
                await self._stream(request, model, lines, interval)
                return b""
            finally:
                self._schedule_expiry(keep_alive)

        return await self.run_job(request, job)

    async def _stream(self, request: Request, model: str, lines: int, interval: float) -> None:
        request.setHeader(b"Content-Type", b"application/x-ndjson")
        for i in range(lines):
            try:
                await self.work(interval)
            except Refusal as e:
                # The status line is gone already; Ollama reports a mid-stream failure
                # as one more line holding "error".
                request.write(json.dumps({"error": e.message}).encode("utf-8") + b"\n")
                return
            line = {"model": model, "response": f"tok{i}", "done": False}
            request.write(json.dumps(line).encode("utf-8") + b"\n")
        request.write(json.dumps({"model": model, "done": True}).encode("utf-8") + b"\n")

    def close(self) -> None:
        self._cancel_expiry()
        super().close()

    def _schedule_expiry(self, seconds: float) -> None:
        self._cancel_expiry()
        if self.model.loaded and self.jobs.active <= 1:
            self._expiry = self.clock.callLater(seconds, self._expire)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None and self._expiry.active():
            self._expiry.cancel()
        self._expiry = None

    def _expire(self) -> None:
        self._expiry = None
        log.info("{name}: keep-alive expired, unloading", name=self.name)
        self.model.unload()


class SimComfy(SimServer):
    """
    An image server that loads its model on the first prompt and keeps it until
    ``POST /api/free``, like ComfyUI.  VRAM figures in ``/system_stats`` are bytes,
    as ComfyUI reports them.
    """

    app = Klein()

    def __init__(self, card: SimulatedCard, *, name: str = "comfyui", **options: Any) -> None:
        options.setdefault("model_mib", 9000)
        super().__init__(card, name=name, **options)
        self.prompts = 0

    @app.route("/system_stats", methods=["GET"])
    def system_stats(self, request: Request) -> bytes:
        state = self.card.snapshot()
        device = {
            "name": f"cuda:0 {state.name}",
            "type": "cuda",
            "index": 0,
            "vram_total": state.total_mib * _MIB,
            "vram_free": state.free_mib * _MIB,
            "torch_vram_total": self.model.resident_mib * _MIB,
            "torch_vram_free": 0,
        }
        system = {"os": "posix", "comfyui_version": "0.0.0-sim"}
        return self.json(request, {"system": system, "devices": [device], **self.health_fields()})

    @app.route("/prompt", methods=["POST"])
    async def prompt(self, request: Request) -> bytes:
        async def job() -> bytes:
            self.json_body(request)
            await self.model.load()
            await self.work()
            self.prompts += 1
            answer = {"prompt_id": str(uuid.uuid4()), "number": self.prompts, "node_errors": {}}
            return self.json(request, answer)

        return await self.run_job(request, job)

    @app.route("/api/free", methods=["POST"])
    def free(self, request: Request) -> bytes:
        try:
            body = self.json_body(request)
        except Refusal as e:
            return self.error(request, e.status, e.message)
        if body.get("unload_models") is True or body.get("free_memory") is True:
            self.model.unload()
        request.setResponseCode(200)
        return b""


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
        card: SimulatedCard,
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
            size = body_size(request)
            return self.json(request, {"text": f"simulated transcript of {size} bytes"})

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
