"""The one expensive pass over events: read -> select -> masses (-> RMM -> score) -> table.

The work is cut into file-chunk tasks (a file and an entry range). Each task computes one
Parquet part ``part-NNNNNN-<provenance>.parquet`` of a partitioned event table, which the
driver writes atomically as it arrives, so a pass that stops (a crash, a server that went
away, SIGKILL) resumes from the parts already written. The driver alone touches the table
folder: a Ray worker gets the model, its card and the column mapping as bytes with the job
and hands its part back through Ray's object store, so a cluster needs no shared
filesystem; each worker reads its inputs itself (local paths that exist on its node, or
root:// and https:// URLs) and an input it cannot read is reported with its node.

A part is reused only when its recorded provenance equals the task's exactly: the input
file (size, modification time and ROOT UUID), the entry range, schema, tree, mapping and
selection, the good-run list, the model (SHA-256 and card) and the code that computes the
rows; anything else is recomputed under another name. The table is committed by
``table.json`` (the list of parts, written last): the previous table stays readable until
then, and parts that the current pass does not own are never read (and are removed after
the commit). One pass writes a folder at a time (`agent.runtime.runlock`).
Executors: ``serial`` (in this process) or ``ray`` (a local Ray instance, or the cluster
at RAY_ADDRESS). Ray retries a task whose worker died, or whose input could not be read
(`RETRIED_ERRORS`: a network or a file system can fail once); an input of the wrong schema,
a model that does not load or a bug fails alike every time and is not retried. A task that
still fails is reported by file and entry range once every other task has finished, never
silently skipped.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import resource
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from rich.console import Console
from rich.progress import Progress

from agent.runtime.executor import SMALL_JOB_EVENTS, Executor, ray_session
from agent.runtime.runlock import run_folder_lock
from core.autoencoder import (
    Scorer,
    card_path,
    load_scorer,
    read_model_card,
    training_selection,
)
from core.errors import AnomscanError, InputFileError, InvalidInputError, SchemaError
from core.events import DistinctFiles, ObjectSelection, add_counts, plan_read, read_entry_range
from core.events import refuse_duplicate_inputs as _refuse_duplicate_inputs
from core.files import atomic_path, file_sha256, remove_dead_temporaries, write_json
from core.goodruns import GoodRunList
from core.masses import STREAMS
from core.table import PART_GLOB, chunk_columns, commit_table_parts

PART_PATTERN = "part-{index:06d}-{provenance}.parquet"
_CODE_MODULES = (
    "core/events/__init__.py",
    "core/events/mappings.py",
    "core/events/nonfinite.py",
    "core/events/planning.py",
    "core/events/raw.py",
    "core/events/reading.py",
    "core/events/schemas.py",
    "core/events/selection.py",
    "core/objects.py",
    "core/masses.py",
    "core/rmm.py",
    "core/table.py",
    "core/goodruns.py",
    "core/autoencoder.py",
    "agent/runtime/eventpass.py",
)


RETRIED_ERRORS: Final = (InputFileError, OSError)
"""The errors of a Ray task that are retried: reading an input, which can pass on the next try."""


def part_task_options(retries: int) -> dict[str, Any]:
    """Ray's options of an event-pass task: one core, `retries` retries on RETRIED_ERRORS."""
    return {"num_cpus": 1, "max_retries": retries, "retry_exceptions": list(RETRIED_ERRORS)}


class EventPassError(AnomscanError):
    """One or more chunks failed after their retries; the message names each file and range."""


class EventPassInputError(EventPassError, InputFileError):
    """Every chunk that failed failed on its input (unreadable, changed, wrong schema)."""


def _pass_error(
    failures: Sequence[tuple[ChunkTask, BaseException]], n_tasks: int, n_kept: int, retries: int
) -> EventPassError:
    """The error of a pass with failed chunks: its first line names the first of them."""
    lines = [
        f"{t.path} entries {t.entry_start}..{t.entry_stop}: {type(e).__name__}: {e}"
        for t, e in sorted(failures, key=lambda failure: failure[0].index)
    ]
    on_input = all(isinstance(e, (InputFileError, SchemaError)) for _, e in failures)
    return (EventPassInputError if on_input else EventPassError)(
        f"{len(failures)} of {n_tasks} chunks failed ({n_kept} parts written are kept and a "
        f"rerun resumes from them; on Ray an unreadable input is retried {retries} times), "
        f"the first: {lines[0]}\n  " + "\n  ".join(lines)
    )


@dataclass(frozen=True)
class ChunkTask:
    """Entries [entry_start, entry_stop) of one file: the unit of parallel work."""

    index: int
    path: str
    entry_start: int
    entry_stop: int
    source: tuple[tuple[str, str], ...] = ()
    """Identity of the input file when the pass was planned: size, mtime and ROOT UUID."""
    provenance: str = ""
    """SHA-256 (hex) of everything the part's rows depend on (see the module docstring)."""
    provenance_record: str = ""
    """The JSON of that provenance, stored in the part and compared on reuse."""


@dataclass(frozen=True)
class PassSpec:
    """How to read and what to compute; travels to every worker."""

    schema: str = "auto"
    selection: ObjectSelection = field(default_factory=ObjectSelection)
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
    non_finite: dict[str, int] = field(default_factory=dict)
    """Non-finite values read per branch (core.events.NON_FINITE_RULE)."""
    dropped_non_finite: dict[str, int] = field(default_factory=dict)
    """Objects and events dropped for them."""


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
    non_finite: dict[str, int] = field(default_factory=dict)
    """Non-finite values read per branch, over every part."""
    dropped_non_finite: dict[str, int] = field(default_factory=dict)
    """Objects and events dropped for them, over every part."""


def plan_chunks(
    files: Sequence[str | Path],
    step_size: int,
    spec: PassSpec,
    max_events: int | None = None,
) -> list[ChunkTask]:
    """Cut every file into tasks of at most `step_size` entries (schemas checked up front)."""
    if step_size <= 0:
        raise InvalidInputError(f"step_size must be positive, got {step_size}")
    _refuse_duplicate_inputs(files)
    distinct = DistinctFiles()
    tasks: list[ChunkTask] = []
    remaining = max_events
    shared = _pass_provenance(spec)
    for given in files:
        path = given if "://" in str(given) else Path(given).absolute()  # workers' cwd differ
        plan = plan_read(path, spec.schema, spec.selection, tree=spec.tree, mapping=spec.mapping)
        distinct.check(str(path), None if plan.file_uuid is None else _uuid(plan.file_uuid))
        source = _file_identity(str(path), plan.file_uuid)
        stop = plan.num_entries if remaining is None else min(plan.num_entries, remaining)
        for start in range(0, stop, step_size):
            end = min(start + step_size, stop)
            record = json.dumps(
                {**shared, "file": dict(source), "entry_start": start, "entry_stop": end},
                sort_keys=True,
            )
            digest = hashlib.sha256(record.encode()).hexdigest()
            tasks.append(ChunkTask(len(tasks), str(path), start, end, source, digest, record))
        if remaining is not None:
            remaining -= stop
            if remaining <= 0:
                break
    return tasks


def _uuid(text: str) -> Any:
    return uuid.UUID(text)


def _file_identity(path: str, file_uuid: str | None) -> tuple[tuple[str, str], ...]:
    """What names a file's content: its ROOT UUID, and size and mtime when it is local."""
    identity = {"path": path, "uuid": file_uuid or ""}
    if "://" not in path:
        status = Path(path).stat()
        identity.update(bytes=str(status.st_size), mtime_ns=str(status.st_mtime_ns))
    return tuple(sorted(identity.items()))


@functools.lru_cache(maxsize=1)
def code_version() -> str:
    """SHA-256 of the source of the modules that compute the event table's rows."""
    root = Path(__file__).resolve().parents[2]
    digest = hashlib.sha256()
    for name in _CODE_MODULES:
        digest.update(name.encode())
        digest.update((root / name).read_bytes())
    return digest.hexdigest()


def _pass_provenance(spec: PassSpec) -> dict[str, Any]:
    """Everything but the file and the entry range that a part's rows depend on."""
    model: dict[str, Any] | None = None
    if spec.model is not None:
        card = read_model_card(Path(spec.model))
        model = {
            "sha256": file_sha256(spec.model),
            "training_fraction": card.fraction,
            "training_seed": card.seed,
        }
    good_runs = None
    if spec.good_runs is not None:
        good_runs = hashlib.sha256(
            json.dumps(
                {
                    str(run): np.asarray(r).tolist()
                    for run, r in sorted(spec.good_runs.ranges.items())
                }
            ).encode()
        ).hexdigest()
    mapping = None
    if spec.mapping is not None:
        mapping = file_sha256(spec.mapping) if Path(spec.mapping).is_file() else spec.mapping
    return {
        "schema": spec.schema,
        "tree": spec.tree,
        "mapping": mapping,
        "selection": spec.selection.as_dict(),
        "good_runs": good_runs,
        "model": model,
        "code": code_version(),
    }


@functools.lru_cache(maxsize=4)
def _cached_scorer(model: str, modified_ns: int, threads: int) -> Any:
    """One onnxruntime session per model file (and version of it) per process."""
    return load_scorer(Path(model), threads=threads)


def _training_function(spec: PassSpec) -> Callable[[Any], Any] | None:
    """The model card's training selection over event keys (None for an unscored pass)."""
    if spec.model is None:
        return None
    card = read_model_card(Path(spec.model))
    return lambda keys: training_selection(keys, card.fraction, card.seed)


def _score_function(spec: PassSpec) -> Callable[[Any], Any] | None:
    if spec.model is None:
        return None
    model = Path(spec.model)
    modified_ns = model.stat().st_mtime_ns if model.is_file() else 0
    scorer: Scorer = _cached_scorer(spec.model, modified_ns, spec.scoring_threads)
    return scorer.score_chunk


@dataclass(frozen=True)
class PassJob:
    """What every Ray task needs besides its chunk: the spec, and the files it names as bytes.

    A worker on another node cannot read the driver's model, model card or column mapping,
    so their contents travel with the job (through Ray's object store) and each worker
    process writes them once into a scratch folder of its own.
    """

    spec: PassSpec
    files: tuple[tuple[str, str, bytes], ...]
    """(role, file name, content): role "model", "card" or "mapping"."""
    driver_host: str


def pass_job(spec: PassSpec) -> PassJob:
    """The job of `spec`, with the contents of the model, its card and a mapping file."""
    files: list[tuple[str, str, bytes]] = []
    if spec.model is not None:
        model = Path(spec.model)
        files += [
            ("model", model.name, model.read_bytes()),
            ("card", card_path(model).name, card_path(model).read_bytes()),
        ]
    if spec.mapping is not None and Path(spec.mapping).is_file():
        files.append(("mapping", Path(spec.mapping).name, Path(spec.mapping).read_bytes()))
    return PassJob(spec, tuple(files), socket.gethostname())


_WORKER_SPECS: dict[str, PassSpec] = {}
"""Per process: the digest of a job's files -> its spec with local paths (checked once)."""


def _worker_spec(job: PassJob) -> PassSpec:
    """The job's spec with its files written into this node's scratch folder.

    The folder (mode 0700, owned by this user, named by the user and the digest of the
    files) is shared by the worker processes of a node: one copy per model, each file
    written atomically. A file found there is used only if its bytes are the job's. On the
    driver's host, where the spec's own files can be read, they are used and nothing is
    copied.
    """
    if not job.files or _readable_here(job):
        return job.spec
    digest = hashlib.sha256()
    for role, name, content in job.files:
        digest.update(f"{role}/{name}/{len(content)}:".encode())
        digest.update(content)
    key = digest.hexdigest()
    if key not in _WORKER_SPECS:
        scratch = Path(tempfile.gettempdir()) / f"anomscan-pass-{os.getuid()}-{key[:20]}"
        scratch.mkdir(mode=0o700, exist_ok=True)
        if scratch.is_symlink() or scratch.stat().st_uid != os.getuid():
            raise InvalidInputError(f"{scratch} belongs to another user; remove it")
        local = {
            role: str(_local_copy(scratch, role, name, content))
            for role, name, content in job.files
        }
        _WORKER_SPECS[key] = replace(
            job.spec,
            model=local.get("model", job.spec.model),
            mapping=local.get("mapping", job.spec.mapping),
        )
    return _WORKER_SPECS[key]


def _readable_here(job: PassJob) -> bool:
    """Whether this is the driver's host and the spec's model, card and mapping read here."""
    if job.driver_host != socket.gethostname():
        return False
    paths = []
    if job.spec.model is not None:
        paths += [Path(job.spec.model), card_path(Path(job.spec.model))]
    if job.spec.mapping is not None and any(role == "mapping" for role, _, _ in job.files):
        paths.append(Path(job.spec.mapping))
    return all(os.access(path, os.R_OK) for path in paths)


def _local_copy(scratch: Path, role: str, name: str, content: bytes) -> Path:
    """`content` at scratch/ROLE/NAME (the card beside the model), written unless there."""
    target = scratch / ("model" if role == "card" else role) / name
    if target.is_file() and target.read_bytes() == content:
        return target
    target.parent.mkdir(exist_ok=True)
    with atomic_path(target, what=f"copy of the pass's {role}") as partial:
        partial.write_bytes(content)
    return target


@dataclass(frozen=True)
class PartBytes:
    """One computed part: its Parquet file as bytes, and what it holds."""

    index: int
    data: bytes
    info: dict[str, Any]
    seconds: float
    peak_rss_mb: float


def compute_part(task: ChunkTask, spec: PassSpec, driver_host: str | None = None) -> PartBytes:
    """Read, select and score one task's events into a Parquet file held in memory.

    Nothing is written: the driver alone writes the run folder (`store_part`), so a worker
    needs to read its inputs and nothing else. `driver_host` is the host that planned the
    pass (None: this one).
    """
    start_time = time.perf_counter()
    same_host = driver_host is None or driver_host == socket.gethostname()
    _check_unchanged(task, same_host)
    chunk = read_entry_range(
        task.path,
        task.entry_start,
        task.entry_stop,
        spec.schema,
        spec.selection,
        tree=spec.tree,
        mapping=spec.mapping,
        good_runs=spec.good_runs,
        file_uuid=dict(task.source).get("uuid") or None,
    )
    rows = chunk_columns(chunk, score=_score_function(spec), training=_training_function(spec))
    _check_unchanged(task, same_host)
    info = {
        "path": task.path,
        "entry_start": task.entry_start,
        "entry_stop": task.entry_stop,
        "n_events": len(chunk),
        "n_outside": chunk.n_outside_good_runs,
        "stream_counts": {s: int(np.count_nonzero(rows[s].to_numpy())) for s in STREAMS},
        "non_finite": dict(chunk.non_finite),
        "dropped_non_finite": dict(chunk.dropped_non_finite),
        "provenance": task.provenance_record,
    }
    rows = rows.replace_schema_metadata(
        {**(rows.schema.metadata or {}), "anomscan": json.dumps(info)}
    )
    sink = pa.BufferOutputStream()
    pq.write_table(rows, sink)
    return PartBytes(
        task.index,
        sink.getvalue().to_pybytes(),
        info,
        time.perf_counter() - start_time,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )


def _part_target(folder: Path, task: ChunkTask) -> Path:
    return folder / PART_PATTERN.format(index=task.index, provenance=task.provenance[:20])


def store_part(folder: Path, task: ChunkTask, part: PartBytes) -> PartResult:
    """Write a computed part into the table folder (atomically) and summarise it."""
    target = _part_target(folder, task)
    with atomic_path(target, what="event-table part") as partial:
        partial.write_bytes(part.data)
    return _part_result(task, target, part.info, part.seconds, part.peak_rss_mb)


def _part_result(
    task: ChunkTask,
    target: Path,
    info: Mapping[str, Any],
    seconds: float = 0.0,
    peak_rss_mb: float = 0.0,
    *,
    reused: bool = False,
) -> PartResult:
    return PartResult(
        task.index,
        str(target),
        int(info["n_events"]),
        int(info["n_outside"]),
        dict(info["stream_counts"]),
        seconds,
        reused,
        peak_rss_mb,
        dict(info.get("non_finite", {})),
        dict(info.get("dropped_non_finite", {})),
    )


def _reusable_part(target: Path, task: ChunkTask) -> PartResult | None:
    """The result of an existing part whose provenance equals the task's, else None."""
    if not target.is_file():
        return None
    try:
        metadata = pq.read_schema(target).metadata or {}
        info = json.loads(metadata.get(b"anomscan", b"{}"))
    except (OSError, ValueError):
        return None  # unreadable: recompute it
    if info.get("provenance") != task.provenance_record:
        return None
    return _part_result(task, target, info, reused=True)


def _check_unchanged(task: ChunkTask, same_host: bool = True) -> None:
    """InputFileError when a local input cannot be read here or changed since the planning.

    On the driver's host the size and modification time must be those planned; on another
    node (its own copy of the file) the size.
    """
    identity = dict(task.source)
    if "bytes" not in identity:
        return
    try:
        status = Path(task.path).stat()
    except OSError as error:
        if same_host and isinstance(error, FileNotFoundError):
            raise InputFileError(f"input file {task.path} went away during the pass") from error
        raise InputFileError(
            f"input file {task.path} cannot be read on {_node_name()} ({error.strerror}); "
            "every worker reads the inputs itself: give paths that every node can read, or "
            "root:// or https:// URLs"
        ) from error
    planned = (identity["bytes"], identity["mtime_ns"] if same_host else str(status.st_mtime_ns))
    if (str(status.st_size), str(status.st_mtime_ns)) != planned:
        raise InputFileError(
            f"input file {task.path} on {_node_name()} is not the file the pass planned "
            "(size or modification time); rerun the pass once the file is final, and give "
            "every node the same copy"
        )


def _node_name() -> str:
    """The host of this process, and its Ray node when it runs in one."""
    host = f"host {socket.gethostname()}"
    try:
        import ray

        if ray.is_initialized():
            return f"{host} (Ray node {ray.get_runtime_context().get_node_id()[:12]})"
    except ImportError:
        pass
    return host


def _remote_part(task: ChunkTask, job: PassJob) -> PartBytes:
    """`compute_part` on a Ray worker; an error names the node it happened on."""
    try:
        return compute_part(task, _worker_spec(job), job.driver_host)
    except AnomscanError as error:
        node = _node_name()
        if node in str(error):
            raise
        raise type(error)(f"{error} (on {node})") from error


def _run_serial(
    tasks: Sequence[ChunkTask], spec: PassSpec, folder: Path, progress: Callable[[int], None]
) -> tuple[list[PartResult], list[tuple[ChunkTask, BaseException]]]:
    results: list[PartResult] = []
    failures: list[tuple[ChunkTask, BaseException]] = []
    for task in tasks:
        progress(task.entry_stop - task.entry_start)
        try:
            part = compute_part(task, spec)
        except AnomscanError as error:
            failures.append((task, error))
            continue
        results.append(store_part(folder, task, part))  # an unwritable folder stops the pass
    return results, failures


def _run_ray(
    tasks: Sequence[ChunkTask],
    spec: PassSpec,
    folder: Path,
    progress: Callable[[int], None],
    workers: int | None,
    retries: int,
) -> tuple[list[PartResult], list[tuple[ChunkTask, BaseException]]]:
    """Tasks on Ray; each part comes back as bytes and the driver writes it as it arrives."""
    results: list[PartResult] = []
    failures: list[tuple[ChunkTask, BaseException]] = []
    with ray_session(workers) as ray:
        remote = ray.remote(**part_task_options(retries))(_remote_part)
        job = ray.put(pass_job(spec))
        pending = {remote.remote(task, job): task for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                task = pending.pop(reference)
                progress(task.entry_stop - task.entry_start)
                try:
                    part = ray.get(reference)
                except Exception as error:  # a RayTaskError wraps the worker's exception
                    failures.append((task, getattr(error, "cause", None) or error))
                    continue
                results.append(store_part(folder, task, part))  # unwritable: stops the pass
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
    with run_folder_lock(folder, "event pass"):
        return _locked_event_pass(
            files, folder, spec, executor, step_size, max_events, workers, retries, progress
        )


def _locked_event_pass(
    files: Sequence[str | Path],
    folder: Path,
    spec: PassSpec,
    executor: Executor,
    step_size: int,
    max_events: int | None,
    workers: int | None,
    retries: int,
    progress: bool,
) -> PassSummary:
    tasks = plan_chunks(files, step_size, spec, max_events)
    write_json(
        folder / "pass.json",
        {
            "tasks": [
                {k: v for k, v in asdict(t).items() if k != "provenance_record"} for t in tasks
            ],
            "schema": spec.schema,
            "selection": spec.selection.as_dict(),
            "model": spec.model,
        },
        what="event-pass plan",
    )
    start_time = time.perf_counter()
    total = sum(t.entry_stop - t.entry_start for t in tasks)
    if executor == "auto":
        executor = "ray" if total >= SMALL_JOB_EVENTS and len(tasks) > 1 else "serial"
    if executor not in ("ray", "serial"):
        raise InvalidInputError(f"executor must be 'serial', 'ray' or 'auto', got {executor!r}")
    reused = {t.index: _reusable_part(_part_target(folder, t), t) for t in tasks}
    results = [r for r in reused.values() if r is not None]
    to_run = [t for t in tasks if reused[t.index] is None]
    with _progress(progress, total) as advance:
        advance(total - sum(t.entry_stop - t.entry_start for t in to_run))
        if executor == "ray" and to_run:
            ran, failures = _run_ray(to_run, spec, folder, advance, workers, retries)
        else:
            ran, failures = _run_serial(to_run, spec, folder, advance)
    results += ran
    if failures:
        raise _pass_error(failures, len(tasks), len(results), retries)
    results.sort(key=lambda r: r.index)
    names = [Path(r.path).name for r in results]
    commit_table_parts(
        folder,
        names,
        {
            "n_events": sum(r.n_events for r in results),
            "scored": spec.model is not None,
            "code": code_version(),
        },
    )
    _remove_unowned(folder, set(names))
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
        non_finite=_summed(r.non_finite for r in results),
        dropped_non_finite=_summed(r.dropped_non_finite for r in results),
    )


def _summed(counts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    total: dict[str, int] = {}
    for one in counts:
        add_counts(total, one)
    return total


def _remove_unowned(folder: Path, owned: set[str]) -> None:
    """Remove parts of earlier passes and temporaries of dead writers (after the commit)."""
    for part in folder.glob(PART_GLOB):
        if part.name not in owned:
            part.unlink(missing_ok=True)
    remove_dead_temporaries(folder)
    for legacy in folder.glob(".part-*.partial"):
        legacy.unlink(missing_ok=True)


@contextlib.contextmanager
def _progress(enabled: bool, total: int) -> Iterator[Callable[[int], None]]:
    """A rich progress bar over events on stderr, or nothing."""
    if not enabled:
        yield lambda advance: None
        return
    with Progress(console=Console(stderr=True)) as bar:
        task = bar.add_task("event pass", total=total)
        yield lambda advance: bar.advance(task, advance)
