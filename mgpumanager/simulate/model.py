"""
A model that occupies the simulated card while it is loaded.

Real inference servers take seconds to load a model and, after dropping it, give the
memory back only when CUDA tears down their state; a scheduler that assumes either is
instant unloads one server and immediately OOMs the next.  :class:`GpuModel` keeps both
delays so that the daemon's "wait until NVML shows the memory freed" is exercised.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

from mgpumanager.simulate.card import CudaOutOfMemory
from mgpumanager.simulate.cards import CardMemory

log = Logger()


class GpuModel:
    """
    One server's model on the card.

    :param owner: the name the card bills the memory to (the server's name).
    :param load_seconds: how long a load takes before the memory is allocated.
    :param unload_seconds: how long after an unload the memory comes back.
    :param offload_to_cpu: load only what fits and run the rest on the CPU, as
        Ollama does, instead of failing with an out-of-memory error.

    ``loaded`` is what the server reports; ``generation`` grows on every load, so a
    job can tell that its model was swapped out under it.  ``oom_count`` counts loads
    refused by the card.
    """

    def __init__(
        self,
        card: CardMemory,
        owner: str,
        model_mib: int,
        clock: IReactorTime,
        load_seconds: float = 0.0,
        unload_seconds: float = 0.1,
        offload_to_cpu: bool = False,
    ) -> None:
        self.card = card
        self.owner = owner
        self.model_mib = model_mib
        self.load_seconds = load_seconds
        self.unload_seconds = unload_seconds
        self.offload_to_cpu = offload_to_cpu
        #: MiB of the model that did not fit and run on the CPU instead (slowly).
        self.offloaded_mib = 0
        self.loaded = False
        self.generation = 0
        self.oom_count = 0
        self._clock = clock
        self._loading: Deferred[None] | None = None
        self._load_waiters: list[Deferred[None]] = []
        self._release_call: IDelayedCall | None = None
        self._release_waiters: list[Deferred[None]] = []

    @property
    def loading(self) -> bool:
        return self._loading is not None

    @property
    def resident_mib(self) -> int:
        """What the card says this model's owner holds, pending releases included."""
        return self.card.held_by(self.owner)

    def load(self) -> Deferred[None]:
        """
        Load the model unless it is loaded; concurrent callers share one load.

        Memory still waiting to be released is released first: a restarting process
        does not hold its old allocation and a new one at the same time.

        :return: fires when loaded, or fails with :class:`CudaOutOfMemory`.
            Cancelling it abandons the wait, not the load.
        """
        if self.loaded:
            return succeed(None)
        waiter: Deferred[None] = Deferred(self._load_waiters.remove)
        self._load_waiters.append(waiter)
        if self._loading is None:
            self._finish_release()
            log.info("{owner} loading {mib} MiB", owner=self.owner, mib=self.model_mib)
            self._loading = deferLater(self._clock, self.load_seconds, self._allocate)
            self._loading.addBoth(self._load_done)
        return waiter

    def unload(self) -> Deferred[None]:
        """
        Drop the model now; its memory comes back ``unload_seconds`` later.

        :return: fires once the memory is back on the card.
        """
        done: Deferred[None] = Deferred(self._release_waiters.remove)
        self._release_waiters.append(done)
        if self._loading is not None:
            # A server asked to unload mid-load finishes loading first.
            after_load = self.load()
            after_load.addErrback(lambda _: None)
            after_load.addCallback(lambda _: self._begin_unload())
        else:
            self._begin_unload()
        return done

    def close(self) -> None:
        """Give everything back at once and leave no timer behind (server shutdown)."""
        if self._loading is not None:
            self._loading.cancel()
        self.loaded = False
        self._finish_release(force=True)

    def _allocate(self) -> None:
        on_gpu = self.model_mib
        if self.offload_to_cpu:
            # Ollama's habit: put as many layers on the GPU as fit, the rest on
            # the CPU.  Slower, never out of memory.
            on_gpu = min(self.model_mib, max(self.card.free_mib, 0))
        self.offloaded_mib = self.model_mib - on_gpu
        if self.offloaded_mib:
            log.info("{owner} offloads {mib} MiB to the CPU", owner=self.owner,
                     mib=self.offloaded_mib)
        if on_gpu:
            self.card.allocate(self.owner, on_gpu)

    def _load_done(self, result: Failure | None) -> None:
        self._loading = None
        waiters, self._load_waiters = self._load_waiters, []
        if isinstance(result, Failure):
            if result.check(CudaOutOfMemory):
                self.oom_count += 1
            for waiter in waiters:
                waiter.errback(result)
            return
        self.loaded = True
        self.generation += 1
        log.info("{owner} loaded", owner=self.owner)
        for waiter in waiters:
            waiter.callback(None)

    def _begin_unload(self) -> None:
        if self.loaded:
            self.loaded = False
            log.info("{owner} unloading", owner=self.owner)
        elif self._release_call is None and self.resident_mib == 0:
            self._finish_release(force=True)
            return
        if self._release_call is None:
            self._release_call = self._clock.callLater(self.unload_seconds, self._finish_release)

    def _finish_release(self, force: bool = False) -> None:
        call, self._release_call = self._release_call, None
        if call is None and not force:
            return
        if call is not None and call.active():
            call.cancel()
        if not self.loaded:
            self.card.release(self.owner)
        waiters, self._release_waiters = self._release_waiters, []
        for waiter in waiters:
            waiter.callback(None)
