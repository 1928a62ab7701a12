"""Fan-out of independent work (spectra, fits) in batches: serial, or Ray on local cores.

Ray costs ~5 s to start and ~0.5 ms per task, so work is cut into a few batches per worker
and small jobs stay serial. RAY_ADDRESS joins an existing cluster.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, TypeVar

Executor = Literal["serial", "ray", "auto"]
"""`auto` runs serially below `SMALL_JOB_EVENTS` events and on Ray above."""

SMALL_JOB_EVENTS = 500_000
"""Below this many events Ray's start-up (~3 s) and each worker's first imports (~2 s,
bench/results/eventpass.json) cost more than a second core gains."""
ItemT = TypeVar("ItemT")
ResultT = TypeVar("ResultT")

BATCHES_PER_WORKER = 2


@contextlib.contextmanager
def ray_session(workers: int | None = None) -> Iterator[Any]:
    """The `ray` module, connected to a local instance or to the cluster at RAY_ADDRESS.

    A session this call started is shut down on exit; one that was running is kept.
    """
    import ray

    started = not ray.is_initialized()
    if started:
        address = os.environ.get("RAY_ADDRESS")
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
