"""The one expensive pass over events: read -> select -> masses (-> RMM -> score) -> table.

The work is cut into file-chunk tasks (a file and an entry range). Each task writes one
Parquet part ``part-NNNNNN.parquet`` of a partitioned event table, atomically, so a pass
that stops (a crash, a server that went away) resumes from the parts already written.
Executors: ``serial`` (in this process) or ``ray`` (a local Ray instance, or the cluster
at RAY_ADDRESS). Ray retries a failing task; a task that still fails is reported by file
and entry range once every other task has finished, never silently skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import resource
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from agent.executor import SMALL_JOB_EVENTS, Executor, ray_session
from core.errors import AnomscanError, InvalidInputError
from core.events import Selection, plan_read, read_entry_range
from core.goodruns import GoodRunList
from core.masses import STREAMS
from core.table import chunk_columns

PART_PATTERN = "part-{index:06d}.parquet"


class EventPassError(AnomscanError):
    """One or more chunks failed after their retries; the message names each file and range."""


@dataclass(frozen=True)
class ChunkTask:
    """Entries [entry_start, entry_stop) of one file: the unit of parallel work."""

    index: int
    path: str
    entry_start: int
    entry_stop: int


@dataclass(frozen=True)
class PassSpec:
    """How to read and what to compute; travels to every worker."""

    schema: str = "auto"
    selection: Selection = field(default_factory=Selection)
    tree: str | None = None
    mapping: str | None = None
    good_runs: GoodRunList | None = None
    model: str | None = None
    """ONNX autoencoder: when given, the pass computes RMMs and fills the score column."""
    scoring_threads: int = 1


@dataclass(frozen=True)
class PartResult:
    """What one task wrote (or found already written)."""

    index: int
    path: str
    n_events: int
    n_outside_good_runs: int
    stream_counts: dict[str, int]
    seconds: float
    reused: bool
    peak_rss_mb: float = 0.0
    """Peak resident memory of the process that ran the task (MB)."""


@dataclass(frozen=True)
class PassSummary:
    """The whole pass: the table folder, counts, and how the work ran."""

    table: Path
    n_events: int
    n_outside_good_runs: int
    n_parts: int
    n_reused: int
    stream_counts: dict[str, int]
    executor: str
    seconds: float
    peak_rss_mb: float = 0.0
    """Largest peak resident memory of any process that ran a task (MB)."""


def plan_chunks(
    files: Sequence[str | Path],
    step_size: int,
    spec: PassSpec,
    max_events: int | None = None,
) -> list[ChunkTask]:
    """Cut every file into tasks of at most `step_size` entries (schemas checked up front)."""
    if step_size <= 0:
        raise InvalidInputError(f"step_size must be positive, got {step_size}")
    tasks: list[ChunkTask] = []
    remaining = max_events
    for path in files:
        plan = plan_read(path, spec.schema, spec.selection, tree=spec.tree, mapping=spec.mapping)
        stop = plan.num_entries if remaining is None else min(plan.num_entries, remaining)
        for start in range(0, stop, step_size):
            tasks.append(ChunkTask(len(tasks), str(path), start, min(start + step_size, stop)))
        if remaining is not None:
            remaining -= stop
            if remaining <= 0:
                break
    return tasks


@functools.lru_cache(maxsize=4)
def _cached_scorer(model: str, modified_ns: int, threads: int) -> Any:
    """One onnxruntime session per model file (and version of it) per process."""
    from core.autoencoder import load_scorer

    return load_scorer(Path(model), threads=threads)


def _score_function(spec: PassSpec) -> Callable[[Any], Any] | None:
    if spec.model is None:
        return None
    from core.rmm import rmm_features, rmm_matrices

    model = Path(spec.model)
    modified_ns = model.stat().st_mtime_ns if model.is_file() else 0
    scorer = _cached_scorer(spec.model, modified_ns, spec.scoring_threads)

    def score(chunk: Any) -> Any:
        return scorer.score(rmm_features(rmm_matrices(chunk)))

    return score


def run_chunk(task: ChunkTask, spec: PassSpec, folder: str) -> PartResult:
    """Process one task and write its part; reuse the part when it already exists."""
    start_time = time.perf_counter()
    target = Path(folder) / PART_PATTERN.format(index=task.index)
    if target.is_file():
        metadata = pq.read_schema(target).metadata or {}
        info = json.loads(metadata.get(b"anomscan", b"{}"))
        if info.get("path") == task.path and info.get("entry_start") == task.entry_start:
            return PartResult(
                task.index,
                str(target),
                int(info["n_events"]),
                int(info["n_outside"]),
                info["stream_counts"],
                0.0,
                True,
            )
    chunk = read_entry_range(
        task.path,
        task.entry_start,
        task.entry_stop,
        spec.schema,
        spec.selection,
        tree=spec.tree,
        mapping=spec.mapping,
        good_runs=spec.good_runs,
    )
    rows = chunk_columns(chunk, score=_score_function(spec))
    counts = {s: int(np.count_nonzero(rows[s].to_numpy())) for s in STREAMS}
    info = {
        "path": task.path,
        "entry_start": task.entry_start,
        "entry_stop": task.entry_stop,
        "n_events": len(chunk),
        "n_outside": chunk.n_outside_good_runs,
        "stream_counts": counts,
    }
    rows = rows.replace_schema_metadata(
        {**(rows.schema.metadata or {}), "anomscan": json.dumps(info)}
    )
    partial = target.with_name(f".{target.name}.partial")
    pq.write_table(rows, partial)
    partial.replace(target)
    return PartResult(
        task.index,
        str(target),
        len(chunk),
        chunk.n_outside_good_runs,
        counts,
        time.perf_counter() - start_time,
        False,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _run_serial(
    tasks: Sequence[ChunkTask], spec: PassSpec, folder: str, progress: Callable[[int], None]
) -> tuple[list[PartResult], list[tuple[ChunkTask, str]]]:
    results, failures = [], []
    for task in tasks:
        try:
            results.append(run_chunk(task, spec, folder))
        except AnomscanError as error:
            failures.append((task, f"{type(error).__name__}: {error}"))
        progress(task.entry_stop - task.entry_start)
    return results, failures


def _run_ray(
    tasks: Sequence[ChunkTask],
    spec: PassSpec,
    folder: str,
    progress: Callable[[int], None],
    workers: int | None,
    retries: int,
) -> tuple[list[PartResult], list[tuple[ChunkTask, str]]]:
    results, failures = [], []
    with ray_session(workers) as ray:
        remote = ray.remote(num_cpus=1, max_retries=retries, retry_exceptions=True)(run_chunk)
        spec_ref = ray.put(spec)
        pending = {remote.remote(task, spec_ref, folder): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                task = pending.pop(reference)
                try:
                    results.append(ray.get(reference))
                except Exception as error:  # a RayTaskError wraps the worker's exception
                    cause = getattr(error, "cause", None) or error
                    failures.append((task, f"{type(cause).__name__}: {cause}"))
                progress(task.entry_stop - task.entry_start)
    return results, failures


def event_pass(
    files: Sequence[str | Path],
    output: str | Path,
    spec: PassSpec | None = None,
    *,
    executor: Executor = "serial",
    step_size: int = 200_000,
    max_events: int | None = None,
    workers: int | None = None,
    retries: int = 2,
    progress: bool = False,
) -> PassSummary:
    """Run the event pass into the folder `output` (a partitioned event table) and summarise.

    Parts already written by an earlier, interrupted pass over the same tasks are reused.
    `executor="auto"` takes Ray from `SMALL_JOB_EVENTS` events on, serial below.
    """
    spec = spec or PassSpec()
    folder = Path(output)
    folder.mkdir(parents=True, exist_ok=True)
    tasks = plan_chunks(files, step_size, spec, max_events)
    (folder / "pass.json").write_text(
        json.dumps(
            {
                "tasks": [asdict(t) for t in tasks],
                "schema": spec.schema,
                "selection": spec.selection.as_dict(),
                "model": spec.model,
            },
            indent=1,
        )
    )
    start_time = time.perf_counter()
    total = sum(t.entry_stop - t.entry_start for t in tasks)
    if executor == "auto":
        executor = "ray" if total >= SMALL_JOB_EVENTS and len(tasks) > 1 else "serial"
    with _progress(progress, total) as advance:
        if executor == "ray":
            results, failures = _run_ray(tasks, spec, str(folder), advance, workers, retries)
        elif executor == "serial":
            results, failures = _run_serial(tasks, spec, str(folder), advance)
        else:
            raise InvalidInputError(f"executor must be 'serial', 'ray' or 'auto', got {executor!r}")
    if failures:
        lines = [f"{t.path} entries {t.entry_start}..{t.entry_stop}: {why}" for t, why in failures]
        raise EventPassError(
            f"{len(failures)} of {len(tasks)} chunks failed after {retries} retries; the "
            f"{len(results)} parts written are kept and a rerun resumes from them:\n  "
            + "\n  ".join(lines)
        )
    streams = {s: sum(r.stream_counts[s] for r in results) for s in STREAMS}
    return PassSummary(
        table=folder,
        n_events=sum(r.n_events for r in results),
        n_outside_good_runs=sum(r.n_outside_good_runs for r in results),
        n_parts=len(results),
        n_reused=sum(r.reused for r in results),
        stream_counts=streams,
        executor=executor,
        seconds=time.perf_counter() - start_time,
        peak_rss_mb=max((r.peak_rss_mb for r in results), default=0.0),
    )


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over events on stderr, or nothing."""
    if not enabled:
        yield lambda advance: None
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("event pass", total=total)
        yield lambda advance: bar.advance(task, advance)
