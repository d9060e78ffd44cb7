"""
A simulated ComfyUI: a prompt queue, one worker, a history and a progress WebSocket.

Like the real one, ``POST /prompt`` only queues: the answer (``prompt_id``, ``number``)
comes at once, and the image exists when ``GET /history/<id>`` is no longer ``{}``.
The model is loaded by the first prompt and kept until ``POST /free``, which waits
for the queue to drain.  Every route is also served under ``/api``, as ComfyUI does.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from klein import Klein
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.web.resource import IResource
from twisted.web.server import Request

from mgpumanager.simulate.card import CudaOutOfMemory
from mgpumanager.simulate.cards import CardMemory
from mgpumanager.simulate.comfy_feed import ProgressFeed
from mgpumanager.simulate.comfy_queue import PromptQueue, QueuedPrompt, tiny_png
from mgpumanager.simulate.server import Refusal, SimServer, number_field

log = Logger()

_MIB = 1024 * 1024

Route = Callable[..., Any]

_app = Klein()


def comfy_route(path: str, methods: list[str]) -> Callable[[Route], Route]:
    """Register a route at ``path`` and at ``/api`` + ``path``, as ComfyUI serves both."""

    def register(f: Route) -> Route:
        routed: Route = _app.route(path, methods=methods)(f)
        prefixed: Route = _app.route("/api" + path, methods=methods)(routed)
        return prefixed

    return register


class SimComfy(SimServer):
    """
    An image server that queues prompts and generates them one after another.

    :param steps: sampler steps per image, each one a ``progress`` message.
    :param answer_when_done: answer ``POST /prompt`` only once the image is made (or
        failed: a CUDA OOM is then a 500), which is what a daemon that treats one HTTP
        exchange as one GPU job expects; the real ComfyUI answers at once.

    For tests: ``queue`` (its :class:`PromptQueue`), ``frees`` (unloads done on
    ``/free``), ``prompts`` (prompts accepted).
    """

    app = _app

    def __init__(
        self,
        card: CardMemory,
        *,
        name: str = "comfyui",
        steps: int = 4,
        answer_when_done: bool = False,
        **options: Any,
    ) -> None:
        options.setdefault("model_mib", 9000)
        super().__init__(card, name=name, **options)
        self.steps = steps
        self.answer_when_done = answer_when_done
        self.queue = PromptQueue()
        self.frees = 0
        self._free_requested = False
        self._images: dict[str, bytes] = {}
        self.feed = ProgressFeed(lambda: self.queue.remaining, self.clock)
        self._worker: Deferred[None] | None = None
        self._step: Deferred[Any] | None = None
        self._waiters: dict[str, list[Deferred[QueuedPrompt]]] = {}

    @property
    def prompts(self) -> int:
        return self.queue.count

    @property
    def websocket_clients(self) -> int:
        """Open ``/ws`` connections."""
        return self.feed.clients

    def close(self) -> None:
        self.queue.clear()
        if self._step is not None:
            self._step.cancel()
        self.feed.close()
        super().close()

    # -- routes ----------------------------------------------------------------------

    @comfy_route("/system_stats", ["GET"])
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
        system = {"os": "posix", "comfyui_version": "0.0.0-sim", "python_version": "3.11"}
        return self.json(request, {"system": system, "devices": [device], **self.health_fields()})

    @comfy_route("/prompt", ["GET"])
    def queue_info(self, request: Request) -> bytes:
        return self.json(request, {"exec_info": {"queue_remaining": self.queue.remaining}})

    @comfy_route("/prompt", ["POST"])
    async def prompt(self, request: Request) -> bytes:
        try:
            body = self.json_body(request)
            work = number_field(body, "work_seconds", self.work_seconds)
        except Refusal as e:
            return self.json(request, _invalid("invalid_prompt", e.message), 400)
        graph = body.get("prompt")
        if not isinstance(graph, dict):
            return self.json(request, _invalid("no_prompt", "No prompt provided"), 400)
        client_id = body.get("client_id")
        prompt_id = str(body.get("prompt_id") or uuid.uuid4())
        queued = self.queue.add(prompt_id, graph, str(client_id) if client_id else None, work)
        self.feed.queue_changed()
        if self.answer_when_done:
            done: Deferred[QueuedPrompt] = Deferred()
            self._waiters.setdefault(prompt_id, []).append(done)
            self._kick()
            finished = await done
            if finished.status_str != "success":
                return self.error(request, 500, _failure_text(finished))
        else:
            self._kick()
        answer = {"prompt_id": prompt_id, "number": queued.number, "node_errors": {}}
        return self.json(request, answer)

    @comfy_route("/queue", ["GET"])
    def get_queue(self, request: Request) -> bytes:
        return self.json(request, self.queue.snapshot())

    @comfy_route("/queue", ["POST"])
    def post_queue(self, request: Request) -> bytes:
        body = self._body_or_empty(request)
        if body.get("clear") is True:
            self.queue.clear()
        delete = body.get("delete")
        if isinstance(delete, list):
            self.queue.delete([str(i) for i in delete])
        self.feed.queue_changed()
        return self._empty_ok(request)

    @comfy_route("/interrupt", ["POST"])
    def interrupt(self, request: Request) -> bytes:
        wanted = self._body_or_empty(request).get("prompt_id")
        running = self.queue.running
        if running is not None and wanted in (None, running.prompt_id):
            if self._step is not None:
                self._step.cancel()
        return self._empty_ok(request)

    @comfy_route("/free", ["POST"])
    def free(self, request: Request) -> bytes:
        body = self._body_or_empty(request)
        if body.get("unload_models") is True or body.get("free_memory") is True:
            # ComfyUI sets a flag that its worker honours once the queue is idle.
            self._free_requested = True
            self._free_if_idle()
        return self._empty_ok(request)

    @comfy_route("/history", ["GET"])
    def all_history(self, request: Request) -> bytes:
        history = {i: p.history_entry() for i, p in self.queue.history.items()}
        return self.json(request, history)

    @comfy_route("/history/<prompt_id>", ["GET"])
    def history(self, request: Request, prompt_id: str) -> bytes:
        prompt = self.queue.history.get(prompt_id)
        return self.json(request, {prompt_id: prompt.history_entry()} if prompt else {})

    @comfy_route("/view", ["GET"])
    def view(self, request: Request) -> bytes:
        names = request.args.get(b"filename") or [b""]
        image = self._images.get(names[0].decode("utf-8", "replace"))
        if image is None:
            request.setResponseCode(404)
            return b""
        request.setHeader(b"Content-Type", b"image/png")
        return image

    @comfy_route("/upload/image", ["POST"])
    def upload_image(self, request: Request) -> bytes:
        try:
            form = self.form_body(request)
        except Refusal as e:
            return self.error(request, e.status, e.message)
        try:
            upload = form.files.get("image")
            if upload is None:
                request.setResponseCode(400)
                return b""
            self._images[upload.filename] = upload.data.read()
        finally:
            form.close()
        folder = form.fields.get("subfolder", "")
        kind = form.fields.get("type", "input")
        return self.json(request, {"name": upload.filename, "subfolder": folder, "type": kind})

    @comfy_route("/object_info", ["GET"])
    def object_info(self, request: Request) -> bytes:
        nodes = {
            name: {"name": name, "display_name": name, "category": category, "output_node": out}
            for name, category, out in (
                ("CheckpointLoaderSimple", "loaders", False),
                ("KSampler", "sampling", False),
                ("SaveImage", "image", True),
            )
        }
        return self.json(request, nodes)

    @comfy_route("/ws", ["GET"])
    def ws(self, request: Request) -> IResource:
        client_ids = request.args.get(b"clientId") or [b""]
        return self.feed.accept(client_ids[0].decode("utf-8", "replace"))

    # -- the worker ------------------------------------------------------------------

    def _kick(self) -> None:
        if self._worker is None:
            self._worker = Deferred.fromCoroutine(self._work_through_queue())

    async def _work_through_queue(self) -> None:
        try:
            while (prompt := self.queue.take()) is not None:
                self.feed.queue_changed()
                await self._execute(prompt)
                # ComfyUI's order: the queue update, then "executing" with no node.
                self.feed.queue_changed()
                self._finished(prompt)
        finally:
            self._worker = None
            self._free_if_idle()

    async def _execute(self, prompt: QueuedPrompt) -> None:
        node = prompt.output_node
        self._event(prompt, "execution_start", {}, record=True)
        self._event(prompt, "execution_cached", {"nodes": []}, record=True)
        self._event(prompt, "executing", {"node": node, "display_node": node})
        try:
            with self.jobs.track(), self.gpu_meter.track():
                await self._interruptible(self.model.load())
                for step in range(1, self.steps + 1):
                    seconds = prompt.work_seconds / max(self.steps, 1)
                    await self._interruptible(Deferred.fromCoroutine(self.work(seconds)))
                    self._event(
                        prompt, "progress", {"value": step, "max": self.steps, "node": node}
                    )
        except CancelledError:
            self._event(prompt, "execution_interrupted", {"node_id": node}, record=True)
            self.queue.finish("error")
            return
        except (CudaOutOfMemory, Refusal) as e:
            if isinstance(e, CudaOutOfMemory):
                self.oom_errors += 1
            error = {
                "node_id": node,
                "exception_message": str(e),
                "exception_type": type(e).__name__,
            }
            self._event(prompt, "execution_error", error, record=True)
            self.queue.finish("error")
            return
        filename = f"ComfyUI_{prompt.number + 1:05}_.png"
        self._images[filename] = tiny_png(prompt.number)
        output = {"images": [{"filename": filename, "subfolder": "", "type": "output"}]}
        prompt.outputs[node] = output
        self._event(prompt, "executed", {"node": node, "display_node": node, "output": output})
        self._event(prompt, "execution_success", {}, record=True)
        self.queue.finish("success")

    async def _interruptible(self, step: Deferred[Any]) -> None:
        self._step = step
        try:
            await step
        finally:
            self._step = None

    def _finished(self, prompt: QueuedPrompt) -> None:
        self._event(prompt, "executing", {"node": None, "display_node": None})
        for waiter in self._waiters.pop(prompt.prompt_id, []):
            if not waiter.called:  # a client that left cancelled its wait
                waiter.callback(prompt)

    def _free_if_idle(self) -> None:
        if self._free_requested and self.queue.remaining == 0:
            self._free_requested = False
            self.frees += 1
            log.info("{name}: freeing memory on request", name=self.name)
            self.model.unload()

    # -- messages --------------------------------------------------------------------

    def _event(
        self, prompt: QueuedPrompt, kind: str, data: dict[str, Any], record: bool = False
    ) -> None:
        data = {**data, "prompt_id": prompt.prompt_id}
        if record:
            data["timestamp"] = int(time.time() * 1000)
            prompt.messages.append([kind, data])
        self.feed.send(prompt.client_id, kind, data)

    def _body_or_empty(self, request: Request) -> dict[str, Any]:
        try:
            return self.json_body(request)
        except Refusal:
            return {}

    @staticmethod
    def _empty_ok(request: Request) -> bytes:
        request.setResponseCode(200)
        return b""


def _invalid(kind: str, message: str) -> dict[str, Any]:
    """ComfyUI's answer to a prompt it will not queue."""
    error = {"type": kind, "message": message, "details": message, "extra_info": {}}
    return {"error": error, "node_errors": {}}


def _failure_text(prompt: QueuedPrompt) -> str:
    for kind, data in prompt.messages:
        if kind == "execution_error":
            return str(data["exception_message"])
    return "the prompt was interrupted"
