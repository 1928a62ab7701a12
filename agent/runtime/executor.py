"""Fan-out of independent work (spectra, fits) in batches: serial, processes, or Ray.

Ray costs ~5 s to start and ~0.5 ms per task, so work is cut into a few batches per worker
and small jobs stay serial. RAY_ADDRESS joins an existing cluster. A scan opens one
`FanOut` for its whole run (one Ray session or one process pool, shut down at the end).
A Ray batch whose worker dies is retried by Ray (`RAY_TASK_RETRIES`); when it still fails
its items run serially in the driver and the fan-out reports it through `on_event`.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Literal, TypeVar

Executor = Literal["serial", "process", "ray", "auto"]
"""`auto` runs serially below `SMALL_JOB_EVENTS` events and on Ray above."""

RAY_TASK_RETRIES = 2
"""Ray re-runs a batch whose worker died this many times before the driver runs it."""

SMALL_JOB_EVENTS = 500_000
"""Below this many events Ray's start-up (~3 s) and each worker's first imports (~2 s,
bench/results/eventpass.json) cost more than a second core gains."""
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

BATCHES_PER_WORKER = 2


@contextlib.contextmanager
def _own_signal_handlers() -> Iterator[None]:
    """Keep the process's SIGTERM and SIGINT handlers across `ray.init`.

    Ray's core installs a C++ failure handler that answers SIGTERM with stack frames; the
    command's own handlers (a clean stop that says what was kept) are put back after it.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    kept = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for number, handler in kept.items():
            if handler is not None:
                signal.signal(number, handler)


@contextlib.contextmanager
def _quiet_stderr(quiet: bool) -> Iterator[None]:
    """File descriptor 2 sent to /dev/null inside the block when `quiet` (restored after).

    Ray's C++ core writes to fd 2 directly while a session stopped mid-task shuts down
    ("task_manager.cc: Failed to push error to driver ..."): a stopped or failed command
    must print its own one line, not those (RAY_BACKEND_LOG_LEVEL cannot silence them
    without an INFO line of its own).
    """
    if not quiet:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        sink = os.open(os.devnull, os.O_WRONLY)
        os.dup2(sink, 2)
        os.close(sink)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


@contextlib.contextmanager
def ray_session(workers: int | None = None) -> Iterator[Any]:
    """The `ray` module, connected to a local instance or to the cluster at RAY_ADDRESS.

    A session this call started is shut down on exit; one that was running is kept. When
    the block ends in an exception (a stop, an error) the shutdown's own messages are
    silenced: the command reports the exception itself.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
        with _own_signal_handlers():
            if address:
                ray.init(address=address, log_to_driver=False, logging_level=logging.ERROR)
            else:
                ray.init(
                    num_cpus=workers,
                    include_dashboard=False,
                    log_to_driver=False,
                    logging_level=logging.ERROR,
                )
    try:
        yield ray
    finally:
        if started:
            with _quiet_stderr(sys.exc_info()[0] is not None):
                ray.shutdown()


def _run_batch(function: Callable[[Any], Any], batch: Sequence[Any]) -> list[Any]:
    return [function(item) for item in batch]


def map_batched(
    function: Callable[[ItemT], ResultT],
    items: Sequence[ItemT],
    executor: Executor = "serial",
    *,
    workers: int | None = None,
) -> list[ResultT]:
    """`[function(item) for item in items]`, in order, run serially or in Ray batches.

    `auto` means Ray when there are more items than batches for the local cores.
    """
    if executor == "auto":
        executor = "ray" if len(items) > BATCHES_PER_WORKER * (os.cpu_count() or 1) else "serial"
    if executor == "serial" or len(items) <= 1:
        return [function(item) for item in items]
    with ray_session(workers) as ray:
        n_workers = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
        n_batches = min(len(items), n_workers * BATCHES_PER_WORKER)
        size = -(-len(items) // n_batches)
        batches = [items[i : i + size] for i in range(0, len(items), size)]
        remote = ray.remote(num_cpus=1)(_run_batch)
        function_ref = ray.put(function)
        results = ray.get([remote.remote(function_ref, batch) for batch in batches])
    return [result for batch in results for result in batch]


def _ray_lost_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """The Ray errors that mean a worker or node went away (not an error of the work)."""
    names = ("WorkerCrashedError", "NodeDiedError", "ObjectLostError", "OwnerDiedError")
    return tuple(getattr(ray.exceptions, name) for name in names if hasattr(ray.exceptions, name))


class FanOut:
    """One scan's executor: `map` runs batches serially, in a process pool or on Ray.

    Open it with `with FanOut(kind) as fan_out:`; the Ray session (or pool) is started at
    the first parallel `map` and closed on exit. `on_event` receives one line for every
    batch that Ray lost and the driver ran instead.
    """

    def __init__(
        self,
        kind: Executor,
        *,
        workers: int | None = None,
        on_event: Callable[[str], None] | None = None,
        small: int | None = None,
    ) -> None:
        self.kind = kind
        self.workers = workers
        self.on_event = on_event
        self.small = BATCHES_PER_WORKER * (os.cpu_count() or 1) if small is None else small
        self._stack = contextlib.ExitStack()
        self._ray: Any = None
        self._pool: ProcessPoolExecutor | None = None
        self.used: set[str] = set()

    def __enter__(self) -> FanOut:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Shut down the pool or the Ray session this fan-out started."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._stack.close()
        self._ray = None

    def _kind_for(self, n_items: int) -> str:
        if n_items <= 1:
            return "serial"
        if self.kind == "auto":
            return "ray" if n_items > self.small else "serial"
        return self.kind

    def _n_workers(self) -> int:
        if self._ray is not None:
            return self.workers or max(1, int(self._ray.cluster_resources().get("CPU", 1)))
        return self.workers or (os.cpu_count() or 1)

    def _batches(self, items: Sequence[ItemT]) -> list[Sequence[ItemT]]:
        n_batches = min(len(items), self._n_workers() * BATCHES_PER_WORKER)
        size = -(-len(items) // n_batches)
        return [items[i : i + size] for i in range(0, len(items), size)]

    def map(self, function: Callable[[ItemT], ResultT], items: Sequence[ItemT]) -> list[ResultT]:
        """`[function(item) for item in items]`, in order."""
        kind = self._kind_for(len(items))
        self.used.add(kind)
        if kind == "serial":
            return [function(item) for item in items]
        if kind == "process":
            if self._pool is None:
                self._pool = ProcessPoolExecutor(
                    self.workers or (os.cpu_count() or 1),
                    mp_context=multiprocessing.get_context("spawn"),
                )
            futures = [
                self._pool.submit(_run_batch, function, batch) for batch in self._batches(items)
            ]
            return [result for future in futures for result in future.result()]
        self.start_ray()
        return self._map_ray(function, items)

    def start_ray(self) -> Any:
        """Start (or join) this fan-out's one Ray session; later sessions of the scan reuse it."""
        if self._ray is None:
            self._ray = self._stack.enter_context(ray_session(self.workers))
        return self._ray

    def _map_ray(self, function: Callable[[ItemT], ResultT], items: Sequence[ItemT]) -> list[Any]:
        ray = self._ray
        batches = self._batches(items)
        remote = ray.remote(num_cpus=1, max_retries=RAY_TASK_RETRIES)(_run_batch)
        function_ref = ray.put(function)
        references = [remote.remote(function_ref, batch) for batch in batches]
        lost = _ray_lost_errors(ray)
        results: list[Any] = []
        for index, (reference, batch) in enumerate(zip(references, batches, strict=True)):
            try:
                results.extend(ray.get(reference))
            except lost as error:
                if self.on_event is not None:
                    self.on_event(
                        f"Ray lost batch {index + 1}/{len(batches)} ({len(batch)} items) after "
                        f"{RAY_TASK_RETRIES} retries ({type(error).__name__}); ran it serially"
                    )
                results.extend(function(item) for item in batch)
        return results
