"""
A GPU job, whichever door it came in by: the facade (``POST /v1/<kind>``), the
passthrough (``/upstream/<consumer>/…``), a consumer's own port, or an
OpenAI-compatible route.  Each door decides *that* a request is a GPU job and
of which consumer and kind; this module runs it, the same way for all.

A job lasts as long as the server's GPU work, which is not always as long as
its HTTP answer: a ComfyUI prompt is answered at once and generated after.
Such a job answers its client as soon as the answer is relayed and keeps the
GPU until the work is done; from then on the client leaving no longer ends it.
"""

from __future__ import annotations

from typing import cast

from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request

from mgpumanager.common.errors import BAD_REQUEST, CONSUMER_DOWN, ApiError
from mgpumanager.config.document import ConsumerConfig
from mgpumanager.config.scheduling import JOB_CLASSES
from mgpumanager.consumers.adapters.base import ANSWER_COPY_BYTES, FollowedWork
from mgpumanager.consumers.adapters.following import Completions
from mgpumanager.relay.proxy import ConsumerProxy
from mgpumanager.scheduling.scheduler import GpuScheduler
from mgpumanager.scheduling.telemetry import COMPLETION_TIMEOUT, NO_TELEMETRY, Telemetry
from mgpumanager.state.registry import ConsumerState, Registry
from mgpumanager.web.job_errors import job_failure_headers, server_timing

log = Logger()


class GpuJobs:
    """
    Runs proxied requests as GPU jobs: refused fast, queued, relayed under the lock.

    :param completions: follows work that outlives its answer (a ComfyUI
        prompt); without it every job ends with its exchange.
    """

    def __init__(
        self,
        registry: Registry,
        scheduler: GpuScheduler,
        proxy: ConsumerProxy,
        telemetry: Telemetry = NO_TELEMETRY,
        completions: Completions | None = None,
    ) -> None:
        self._registry = registry
        self._completions = completions
        self._scheduler = scheduler
        self._proxy = proxy
        self._telemetry = telemetry

    def refused(self, consumer: str, kind: str, refusal: ApiError) -> None:
        """Count a job a door refused before it got here (``consumer`` "" when none)."""
        self._telemetry.job_refused(consumer, kind, refusal.kind.code)

    def run(
        self, request: Request, consumer: ConsumerConfig, method: str, path: str, kind: str
    ) -> Deferred[None]:
        """
        Relay ``request`` to ``consumer`` as ``method path`` once it holds the
        GPU.  Fires when the answer has been relayed; cancelling it (the
        client left) leaves the queue or cancels the relay.  Work that goes on
        after the answer keeps the GPU, whatever the client does.

        :param path: the consumer's path, sent as given (already encoded).
        :param kind: the endpoint kind the job is of.
        """
        state = self._registry[consumer.name]
        if state.healthy is False and not state.restartable:
            self._telemetry.job_refused(consumer.name, kind, CONSUMER_DOWN.code)
            raise ApiError(
                CONSUMER_DOWN,
                f"upstream {consumer.name}: last health probe failed: {state.last_error}",
                consumer.name,
            )
        try:
            job_class, priority = job_class_and_priority(
                request, self._scheduler.class_of(kind), consumer.priority
            )
        except ApiError as refusal:
            self.refused(consumer.name, kind, refusal)
            raise
        answered: Deferred[None] = Deferred(lambda _: job.cancel())
        watch = self._telemetry.job(consumer.name, kind)
        job: Deferred[str | None] = watch.ended(
            self._scheduler.submit(
                consumer.name,
                watch.running(lambda: self._job(request, consumer, method, path, answered)),
                kind=kind,
                job_class=job_class,
                priority=priority,
            ).addErrback(job_failure_headers)
        )
        job.addBoth(_answer_once, answered)
        return answered

    def _job(
        self,
        request: Request,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        answered: Deferred[None],
    ) -> Deferred[str | None]:
        """
        The job under the lock; its result is the outcome label when not plain
        ``ok``.  A job that ends with its exchange (nearly all) is the relay's
        own Deferred: a coroutine around it would be one more layer to start
        and resume on every request.
        """
        running = self._scheduler.current_job()
        if running is not None:
            timing = self._scheduler.running_timing(running)
            request.setHeader(b"server-timing", server_timing(timing).encode("ascii"))
        completions = self._completions
        state = self._registry[consumer.name]
        if completions is None or not completions.completes_later(state, method, path):
            # Fires with None: the outcome of a job that ends with its answer.
            relayed = self._proxy.relay(request, consumer, method, path)
            return cast("Deferred[str | None]", relayed)
        return Deferred.fromCoroutine(
            self._job_completing(request, consumer, method, path, answered, completions, state)
        )

    async def _job_completing(
        self,
        request: Request,
        consumer: ConsumerConfig,
        method: str,
        path: str,
        answered: Deferred[None],
        completions: Completions,
        state: ConsumerState,
    ) -> str | None:
        """A job whose server's work outlives its answer: the GPU is held until it ends."""
        running = self._scheduler.current_job()
        try:
            answer = await self._proxy.relay_keeping(
                request, consumer, method, path, ANSWER_COPY_BYTES
            )
        except Exception:
            # Broken before the answer said what it started (the client left
            # mid-answer, the server cut it): the server may be at work all
            # the same, so the GPU stays held until it is idle again.
            await completions.settle(state)
            raise
        work = completions.work_started_by(state, answer)
        if work is None:
            return None
        if running is not None:
            self._scheduler.completing(running, work.work_id)
        answered.callback(None)
        how = await self._follow(completions, state, work)
        return COMPLETION_TIMEOUT if how == "timeout" else None

    async def _follow(
        self, completions: Completions, state: ConsumerState, work: FollowedWork
    ) -> str:
        # The state the job began with: a reload may have removed the consumer since.
        how = await work.until_done()
        log.info(
            "{consumer}: {work_id} ended ({how}); the GPU is free",
            consumer=state.name,
            work_id=work.work_id,
            how=how,
        )
        completions.outcome(state, work.work_id, how)
        return str(how)


def _answer_once(result: Failure | str | None, answered: Deferred[None]) -> None:
    """
    Pass the job's end to the client's Deferred, unless the client already
    has its answer (the job went on with the server's work).
    """
    if not answered.called:
        if isinstance(result, Failure):
            answered.errback(result)
        else:
            answered.callback(None)
    elif isinstance(result, Failure) and not result.check(CancelledError):
        log.failure("a job failed after its answer was sent", result)


def job_class_and_priority(request: Request, job_class: str, priority: int) -> tuple[str, int]:
    """
    The job's class and priority: the defaults given, unless the request sets
    ``X-Mgpu-Class`` (``interactive`` | ``batch``) or ``X-Mgpu-Priority`` (0-4).

    :raises ApiError: ``bad_request`` for any other value, before the job queues.
    """
    given_class = _header(request, b"x-mgpu-class")
    if given_class is not None:
        job_class = given_class.strip().lower()
        if job_class not in JOB_CLASSES:
            raise ApiError(
                BAD_REQUEST,
                f"X-Mgpu-Class must be one of {', '.join(JOB_CLASSES)}, not {given_class!r}",
            )
    given_priority = _header(request, b"x-mgpu-priority")
    if given_priority is not None:
        text = given_priority.strip()
        if not (text.isascii() and text.isdigit() and 0 <= int(text) <= 4):
            raise ApiError(
                BAD_REQUEST,
                f"X-Mgpu-Priority must be a whole number from 0 to 4, not {given_priority!r}",
            )
        priority = int(text)
    return job_class, priority


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")
