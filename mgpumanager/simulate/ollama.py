"""
A simulated Ollama: its native API (``/api/...``) and its OpenAI compatibility layer
(``/v1/...``), answering in the shapes the official ``ollama`` and ``openai`` Python
clients parse.

Memory habits are Ollama's: a model is loaded by the first request naming it and
stays for its ``keep_alive`` (see :mod:`mgpumanager.simulate.ollama_models`); a
request with ``keep_alive: 0`` and nothing to generate unloads it, which is what
``ollama stop`` sends.  A full card does not make it fail: it offloads layers to the
CPU and holds whatever fits.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import attrs
from klein import Klein
from twisted.web.server import Request

from mgpumanager.simulate import openai_shapes as openai
from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.model import GpuModel
from mgpumanager.simulate.ollama_models import (
    DEFAULT_EMBED_MODEL,
    CatalogueModel,
    Runners,
    parse_keep_alive,
    rfc3339,
)
from mgpumanager.simulate.server import Refusal, SimServer, number_field


@attrs.frozen
class _Ask:
    """What one generation request asks for."""

    model: str
    lines: int
    interval: float
    keep_alive: float | None
    stream: bool


class SimOllama(SimServer):
    """
    An LLM server that runs its own model memory, like Ollama.

    :param keep_alive_seconds: how long a model stays after its last request
        (``None``: forever), unless a request says otherwise.
    :param num_lines: default number of tokens a generation makes.
    :param interval: default time each token takes.
    :param model_name: its default model, the one ``model_mib`` sizes.
    :param embed_model: a second, small model for embeddings.

    A request's JSON may override ``num_lines`` and ``interval`` (stand-in fields the
    real server ignores) as well as Ollama's own ``keep_alive`` and ``stream``.
    """

    app = Klein()

    def __init__(
        self,
        card: CardMemory,
        *,
        name: str = "ollama",
        keep_alive_seconds: float | None = 300.0,
        num_lines: int = 20,
        interval: float = 0.05,
        model_name: str = "sim-llm:7b",
        embed_model: str = DEFAULT_EMBED_MODEL,
        embed_mib: int = 600,
        **options: Any,
    ) -> None:
        options.setdefault("model_mib", 6000)
        options.setdefault("work_seconds", 0.0)
        super().__init__(card, name=name, **options)
        catalogue = [
            CatalogueModel(model_name, self.model.model_mib),
            CatalogueModel(embed_model, embed_mib, "bert", "137M", embedding=True),
        ]
        self.runners = Runners(
            card,
            self.clock,
            name,
            catalogue,
            keep_alive_seconds,
            self.model.load_seconds,
            self.model.unload_seconds,
        )
        #: The default model, the one the daemon's single-model view is about.
        self.model = self.runners.models[model_name]
        self.keep_alive_seconds = keep_alive_seconds
        self.num_lines = num_lines
        self.interval = interval
        self.model_name = model_name

    def close(self) -> None:
        self.runners.close()
        super().close()

    # -- native API ------------------------------------------------------------------

    @app.route("/api/version", methods=["GET"])
    def version(self, request: Request) -> bytes:
        return self.json(request, {"version": "0.0.0-sim"})

    @app.route("/api/tags", methods=["GET"])
    def tags(self, request: Request) -> bytes:
        return self.json(request, {"models": [m.tag() for m in self.runners.catalogue.values()]})

    @app.route("/api/ps", methods=["GET"])
    def ps(self, request: Request) -> bytes:
        return self.json(request, {"models": self.runners.ps()})

    @app.route("/api/show", methods=["POST"])
    def show(self, request: Request) -> bytes:
        try:
            entry = self.runners.find(str(self.json_body(request).get("model", "")))
        except Refusal as e:
            return self.error(request, e.status, e.message)
        document = {
            "modelfile": f"FROM {entry.name}\n",
            "parameters": "",
            "template": "{{ .Prompt }}",
            "details": entry.details,
            "model_info": {"general.architecture": entry.family},
            "capabilities": ["embedding"] if entry.embedding else ["completion"],
            "modified_at": "2026-01-01T00:00:00Z",
        }
        return self.json(request, document)

    @app.route("/api/generate", methods=["POST"])
    async def generate(self, request: Request) -> bytes:
        return await self._native(request, chat=False)

    @app.route("/api/chat", methods=["POST"])
    async def chat(self, request: Request) -> bytes:
        return await self._native(request, chat=True)

    @app.route("/api/embed", methods=["POST"])
    async def embed(self, request: Request) -> bytes:
        async def job() -> bytes:
            body = self.json_body(request)
            ask = self._ask(body, stream=False)
            inputs = openai.texts(body.get("input", []))
            await self._compute(ask)
            vectors = [openai.fake_embedding(text) for text in inputs]
            count = sum(len(text.split()) for text in inputs)
            answer = {"model": ask.model, "embeddings": vectors, "prompt_eval_count": count}
            return self.json(request, {**answer, "total_duration": 1000, "load_duration": 0})

        return await self.run_job(request, job)

    @app.route("/api/embeddings", methods=["POST"])
    async def embeddings(self, request: Request) -> bytes:
        async def job() -> bytes:
            body = self.json_body(request)
            ask = self._ask(body, stream=False)
            await self._compute(ask)
            prompt = body.get("prompt")
            vector = openai.fake_embedding(prompt) if isinstance(prompt, str) and prompt else []
            return self.json(request, {"embedding": vector})

        return await self.run_job(request, job)

    async def _native(self, request: Request, chat: bool) -> bytes:
        try:
            body = self.json_body(request)
            ask = self._ask(body, stream=True)
        except Refusal as e:
            return self.error(request, e.status, e.message)
        made = _NativeAnswer(ask.model, chat, self._now())
        if not body.get("messages" if chat else "prompt"):
            # Nothing to generate: Ollama only loads, or with keep_alive 0 unloads.
            if ask.keep_alive == 0:
                self.runners.unload(ask.model)
                return self.json(request, made.end("", 0, "unload"))

            async def load() -> bytes:
                await self._compute(ask)
                return self.json(request, made.end("", 0, "load"))

            return await self.run_job(request, load)

        async def job() -> bytes:
            with self.runners.using(ask.model, ask.keep_alive) as model:
                await model.load()
                await self.work(model=model)
                if not ask.stream:
                    tokens = [token async for token in self._tokens(ask, model)]
                    return self.json(request, made.end("".join(tokens), len(tokens)))
                request.setHeader(b"Content-Type", b"application/x-ndjson")
                await self._relay(
                    request,
                    self._tokens(ask, model),
                    part=lambda token: _line(made.part(token)),
                    end=lambda count: _line(made.end("", count)),
                    # The status line is gone already: Ollama reports a failure
                    # mid-stream as one more line holding "error".
                    fail=lambda message: _line({"error": message}),
                )
                return b""

        return await self.run_job(request, job)

    # -- OpenAI compatibility --------------------------------------------------------

    @app.route("/v1/models", methods=["GET"])
    def openai_models(self, request: Request) -> bytes:
        names = list(self.runners.catalogue)
        return self.json(request, openai.models(names, int(self.clock.seconds())))

    @app.route("/v1/chat/completions", methods=["POST"])
    async def openai_chat(self, request: Request) -> bytes:
        return await self._openai_completion(request, chat=True)

    @app.route("/v1/completions", methods=["POST"])
    async def openai_completions(self, request: Request) -> bytes:
        return await self._openai_completion(request, chat=False)

    @app.route("/v1/embeddings", methods=["POST"])
    async def openai_embeddings(self, request: Request) -> bytes:
        async def job() -> bytes:
            body = self.json_body(request)
            ask = self._ask(body, stream=False)
            inputs = openai.texts(body.get("input"))
            if not inputs:
                raise Refusal(400, "invalid input: expected a string or a list of strings")
            await self._compute(ask)
            encoding = str(body.get("encoding_format") or "float")
            return self.json(request, openai.embeddings(ask.model, inputs, encoding))

        return await self.run_job(request, job)

    async def _openai_completion(self, request: Request, chat: bool) -> bytes:
        async def job() -> bytes:
            body = self.json_body(request)
            ask = self._ask(body, stream=False)
            asked = body.get("messages") if chat else body.get("prompt")
            if not asked:
                raise Refusal(400, "'messages' is required" if chat else "'prompt' is required")
            completion = openai.Completion(ask.model, int(self.clock.seconds()), chat)
            with self.runners.using(ask.model, ask.keep_alive) as model:
                await model.load()
                await self.work(model=model)
                if not ask.stream:
                    tokens = [token async for token in self._tokens(ask, model)]
                    whole = completion.whole("".join(tokens), len(str(asked).split()), len(tokens))
                    return self.json(request, whole)
                request.setHeader(b"Content-Type", b"text/event-stream")
                await self._relay(
                    request,
                    self._tokens(ask, model),
                    part=lambda token: openai.sse(completion.chunk(token)),
                    end=lambda _: openai.sse(completion.chunk("", "stop")) + openai.DONE_EVENT,
                    fail=lambda message: openai.sse(openai.error(message, "api_error")),
                )
                return b""

        return await self.run_job(request, job)

    # -- shared ----------------------------------------------------------------------

    def _ask(self, body: dict[str, Any], stream: bool) -> _Ask:
        """
        :raises Refusal: 400 for malformed fields, 404 for a model not pulled.
        """
        entry = self.runners.find(str(body.get("model") or self.model_name))
        wants_stream = body.get("stream", stream)
        return _Ask(
            model=entry.name,
            lines=int(number_field(body, "num_lines", self.num_lines)),
            interval=number_field(body, "interval", self.interval),
            keep_alive=parse_keep_alive(body.get("keep_alive"), self.keep_alive_seconds),
            stream=wants_stream is not False,
        )

    async def _compute(self, ask: _Ask) -> None:
        """Load ``ask.model`` if needed and run one step of work on it."""
        with self.runners.using(ask.model, ask.keep_alive) as model:
            await model.load()
            await self.work(model=model)

    async def _tokens(self, ask: _Ask, model: GpuModel) -> AsyncIterator[str]:
        for i in range(ask.lines):
            await self.work(ask.interval, model=model)
            yield f"tok{i}"

    @staticmethod
    async def _relay(
        request: Request,
        tokens: AsyncIterator[str],
        part: Callable[[str], bytes],
        end: Callable[[int], bytes],
        fail: Callable[[str], bytes],
    ) -> None:
        """Write each token as it is made, then the end of the stream."""
        count = 0
        try:
            async for token in tokens:
                request.write(part(token))
                count += 1
        except Refusal as e:
            request.write(fail(e.message))
            return
        request.write(end(count))

    def _now(self) -> str:
        return rfc3339(self.clock.seconds())


def _line(document: object) -> bytes:
    return json.dumps(document).encode("utf-8") + b"\n"


@attrs.frozen
class _NativeAnswer:
    """The lines of one ``/api/generate`` or ``/api/chat`` answer."""

    model: str
    chat: bool
    created_at: str

    def part(self, text: str, done: bool = False) -> dict[str, Any]:
        answer: dict[str, Any] = {"model": self.model, "created_at": self.created_at}
        if self.chat:
            answer["message"] = {"role": "assistant", "content": text}
        else:
            answer["response"] = text
        answer["done"] = done
        return answer

    def end(self, text: str, count: int, reason: str = "stop") -> dict[str, Any]:
        answer = {**self.part(text, done=True), "done_reason": reason}
        if reason == "stop":
            answer.update(
                total_duration=1_000_000 * (count + 1),
                load_duration=0,
                prompt_eval_count=1,
                prompt_eval_duration=1_000_000,
                eval_count=count,
                eval_duration=1_000_000 * count,
            )
            if not self.chat:
                answer["context"] = [1, 2, 3]
        return answer
