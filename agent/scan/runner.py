"""Everything a scan needs around its graph: configuration, run folder, tool calls, results.

A run folder holds config.json, data/ (a generated sample), model/, events/ (the event
table), spectra/ and points/ (per AR point: histograms, backgrounds, results), lee/, the
audit log audit.sqlite, LangGraph's checkpoints.sqlite, results.json and results.csv.

Every tool the graph uses goes through `ScanContext.call_tools`: the calls run on the
executor (serial, processes or Ray), and the driver logs each one (tool, input JSON,
output JSON or its hash and file, duration, worker) in the audit; `anomscan replay`
re-runs exactly these.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import glob
import hashlib
import json
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from agent.policy.protocol import Policy
from agent.policy.rules import RulesPolicy
from agent.runtime.audit import (
    INLINE_OUTPUT_BYTES,
    AuditLog,
    canonical_json,
    sha256_file,
    sha256_text,
)
from agent.runtime.executor import Executor, FanOut
from core.background import CheckOptions
from core.errors import AnomscanError, InvalidInputError, StorageError
from core.files import MANIFEST_NAME, check_regular_file, read_manifest
from core.spectrum import MIN_EVENTS_IN_FIT_RANGE
from tools.registry import get_tool

CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoints.sqlite"
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"

REPLAYABLE_TOOLS = frozenset(
    {
        "choose_background",
        "fit_background",
        "bump_hunt",
        "search_spectrum",
        "analyse_spectrum",
        "scan_significance",
        "robustness_checks",
        "set_limits",
    }
)
"""Pure tools: their output is a function of their logged input (and the files it names,
whose hashes are in `artifacts`). Training and generation write files and are not replayed."""


BUILTIN_EVENTS = 100_000
"""Background events of the built-in synthetic sample (a scan without DATA)."""


class ScanConfig(BaseModel):
    """What a scan was asked to do; written to RUN/config.json and the `runs` table."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    data: list[str] = Field(default_factory=list, description="ROOT files or globs")
    manifest: str | None = None
    lumi_pb: float | None = Field(None, gt=0)
    run_dir: str
    points_per_decade: int = Field(4, ge=1, le=50)
    xsec_range: tuple[float, float] = (0.001, 100.0)
    budget_minutes: float | None = Field(None, gt=0)
    max_points: int | None = Field(
        None, ge=1, description="AR point budget, refinements included; null = grid + 6"
    )
    executor: Executor = "auto"
    seed: int = Field(0, ge=0)
    model: str | None = None
    policy: Literal["rules", "llm"] = "rules"
    llm_base_url: str | None = Field(None, description="OpenAI-compatible endpoint (llm policy)")
    llm_model: str | None = Field(None, description="chat model name (llm policy)")
    llm_timeout_s: float = Field(60.0, gt=0, description="per LLM request")
    llm_max_rejections: int = Field(3, ge=0, description="refused proposals sent back per decision")
    llm_max_calls: int = Field(2000, ge=0, description="LLM requests per scan")
    llm_max_tokens: int = Field(3_000_000, ge=0, description="LLM tokens per scan")
    events: int | None = Field(
        None, ge=1000, description="size of the built-in sample (null: 100 000; or data given)"
    )
    epochs: int = Field(30, ge=1, description="autoencoder training epochs (when trained)")
    fallback_budget: int = Field(4, ge=0, description="symbolic-fallback searches per scan")
    fallback_time_s: float = Field(60.0, gt=0)
    min_events: int = Field(
        MIN_EVENTS_IN_FIT_RANGE, ge=1, description="events above the fit start to fit"
    )
    gof_toys: int = Field(
        CheckOptions().n_linear_toys,
        ge=10,
        description="toys of the goodness of fit where bins are sparse",
    )
    n_pseudo_scans: int = Field(1000, ge=1)
    max_pseudo_scans: int = Field(20_000, ge=1)
    limits: bool = Field(False, description="set 95 % CL limits as the last node")

    @field_validator("xsec_range")
    @classmethod
    def _ordered_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not 0 < low < high:
            raise ValueError(f"expected 0 < LO < HI pb, found {low:g} {high:g}")
        return value

    def grid_size(self) -> int:
        """Points of the initial log-uniform grid."""
        from core.anomaly import log_uniform_xsec_grid

        low, high = self.xsec_range
        return len(log_uniform_xsec_grid(self.points_per_decade, low, high))

    def point_budget(self) -> int:
        """The most AR points the scan may scan."""
        return self.max_points if self.max_points is not None else self.grid_size() + 6


def package_versions() -> dict[str, str]:
    """Versions of the packages a result depends on."""
    names = (
        "anomscan",
        "numpy",
        "scipy",
        "iminuit",
        "onnxruntime",
        "uproot",
        "awkward",
        "pydantic",
        "langgraph",
        "ray",
    )
    versions = {"python": sys.version.split()[0]}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass(frozen=True)
class Inputs:
    """The data files of a scan and its luminosity (pb^-1)."""

    files: tuple[str, ...]
    lumi_pb: float
    schema: str = "auto"
    source: str = ""


def resolve_inputs(config: ScanConfig) -> Inputs | None:
    """Files and luminosity of a scan on given data (None: the built-in sample is generated).

    DATA may be ROOT files, globs, URLs or folders: a folder stands for its *.root files,
    and a folder written by `anomscan generate` also gives its luminosity (its manifest.json)
    when none is given. `manifest` is a dataset manifest (TOML), or the manifest.json of a
    generated sample. Raises InvalidInputError for a missing or unreadable file, an empty
    glob or folder, or no luminosity from the manifest, the sample or `lumi_pb`.
    """
    files: list[str] = []
    lumi = config.lumi_pb
    schema = "auto"
    source = "files"
    patterns = list(config.data)
    if config.manifest is not None and Path(config.manifest).name == MANIFEST_NAME:
        patterns.append(str(Path(config.manifest).parent))
    elif config.manifest is not None:
        from core.datasets import load_manifest

        datasets = load_manifest(config.manifest)
        for dataset in datasets.values():
            files.extend(dataset.files)
            schema = dataset.schema
        if lumi is None:
            lumi = sum(d.lumi_pb for d in datasets.values() if d.kind == "data") or None
        source = f"manifest {config.manifest}"
    for pattern in patterns:
        if "://" in pattern:
            files.append(pattern)
            continue
        if Path(pattern).is_dir():
            folder_files, folder_lumi = _sample_folder(Path(pattern))
            files.extend(folder_files)
            lumi = lumi if lumi is not None else folder_lumi
            continue
        files.extend(_matching_files(pattern))
    if not files:
        if config.manifest is not None:
            raise InvalidInputError(f"manifest {config.manifest} lists no files")
        return None
    if lumi is None:
        raise InvalidInputError(
            "no luminosity: give --lumi-pb L (pb^-1) or a --manifest with lumi_pb; the anomaly "
            "regions (N = sigma x L events) need it"
        )
    return Inputs(tuple(files), float(lumi), schema, source)


def _matching_files(pattern: str) -> list[str]:
    """The readable files a path or glob names (absolute)."""
    matches = (
        sorted(glob.glob(pattern))  # noqa: PTH207 (absolute patterns too)
        if glob.has_magic(pattern)
        else [pattern]
    )
    if not matches:
        raise InvalidInputError(
            f"no file matches {pattern!r}; give ROOT files, globs or --manifest"
        )
    files = []
    for match in matches:
        path = check_regular_file(match, "data file")
        if not os.access(path, os.R_OK):
            raise InvalidInputError(f"data file {path} is not readable; fix its permissions")
        files.append(str(path.resolve()))
    return files


def _sample_folder(folder: Path) -> tuple[list[str], float | None]:
    """A folder's *.root files, and the luminosity its `anomscan generate` manifest records."""
    files = [file for path in sorted(folder.glob("*.root")) for file in _matching_files(str(path))]
    if not files:
        raise InvalidInputError(
            f"folder {folder} holds no .root file; give ROOT files, a folder of them or --manifest"
        )
    manifest = read_manifest(folder)
    lumi = None if manifest is None else manifest.get("lumi_pb")
    if isinstance(lumi, int | float) and math.isfinite(lumi) and lumi > 0:
        return files, float(lumi)
    return files, None


def write_config(config: ScanConfig) -> Path:
    """Create the run folder and write its config.json (refused if a scan is there already)."""
    folder = Path(config.run_dir)
    if (folder / CONFIG_FILE).exists():
        raise InvalidInputError(
            f"{folder} already holds a scan; continue it with `anomscan scan --resume "
            f"{folder}` or choose another --out"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
        write_atomic(folder / CONFIG_FILE, json.dumps(config.model_dump(mode="json"), indent=1))
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the run folder {folder}: {error.strerror}; choose a writable --out"
        ) from error
    return folder


def read_config(run_dir: Path) -> ScanConfig:
    """The config of the scan in `run_dir`, acting on `run_dir` as it is now.

    A run folder is self-contained: the `run_dir` recorded when it was made is replaced by
    the folder given, so a copied run resumes (or is reported, limited, injected) in the
    copy, and a moved one where it is now.
    """
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise InvalidInputError(
            f"{run_dir} is not a scan's run folder (no {CONFIG_FILE}); give the --out of a scan"
        )
    try:
        config = ScanConfig.model_validate_json(path.read_text())
    except ValidationError as error:
        raise InvalidInputError(f"{path} is not a valid scan config: {error}") from error
    return config.model_copy(update={"run_dir": str(run_dir.resolve())})


def run_tool(call: tuple[str, dict[str, Any]]) -> dict[str, Any]:
    """Run one tool (in any process): its output or its error, the duration and the worker."""
    name, payload = call
    start = time.perf_counter()
    output: dict[str, Any] | None = None
    error: str | None = None
    try:
        output = get_tool(name).call(payload)
    except ValidationError as problem:
        error = f"invalid input: {problem}"
    except AnomscanError as problem:
        error = f"{type(problem).__name__}: {problem}"
    return {
        "output": output,
        "error": error,
        "seconds": time.perf_counter() - start,
        "worker": f"{socket.gethostname()}:{os.getpid()}",
    }


def locate_path(path: str, run_dir: Path, original: Path | None) -> Path:
    """The file a logged input path names, in the run folder as it is now."""
    named = Path(path)
    if not named.is_absolute():
        return run_dir / named
    if original is not None and named.is_relative_to(original):
        return run_dir / named.relative_to(original)
    return named


def relocate_paths(value: Any, run_dir: Path, original: Path | None) -> Any:
    """`value` with every path field pointing at its file in the run folder as it is now."""
    if isinstance(value, dict):
        return {
            key: (
                str(locate_path(item, run_dir, original))
                if (key == "path" or key.endswith("_path")) and isinstance(item, str)
                else relocate_paths(item, run_dir, original)
            )
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [relocate_paths(item, run_dir, original) for item in value]
    return value


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one logged tool call."""

    label: str
    output: dict[str, Any] | None
    error: str | None


@dataclass
class Progress:
    """What the progress display shows: stage, AR points done / planned, and more.

    Also the spectra of the current point done / to fit, the elapsed time and the ETA of
    the planned points (from the mean time per point done; refinements add points).
    """

    stage: str = "starting"
    point: str = ""
    points_done: int = 0
    points_planned: int = 0
    spectra_done: int = 0
    spectra_total: int = 0
    started: float = field(default_factory=time.monotonic)
    sweep_started: float | None = None
    callback: Callable[[Progress], None] | None = None

    def update(self, **changes: Any) -> None:
        """Change some fields and redraw."""
        for key, value in changes.items():
            setattr(self, key, value)
        if self.points_planned and self.sweep_started is None:
            self.sweep_started = time.monotonic()
        if self.callback is not None:
            self.callback(self)

    def fraction(self) -> float:
        """The share of the planned AR points done (the current point by its spectra)."""
        if not self.points_planned:
            return 0.0
        current = self.spectra_done / self.spectra_total if self.spectra_total else 0.0
        return min(1.0, (self.points_done + current) / self.points_planned)

    def eta_s(self) -> float | None:
        """Seconds left for the planned points, from the mean time of the points done."""
        if self.sweep_started is None or self.points_done == 0:
            return None
        per_point = (time.monotonic() - self.sweep_started) / self.points_done
        return max(0.0, per_point * (self.points_planned - self.points_done))

    def line(self) -> str:
        """One line of progress."""
        parts = [self.stage]
        if self.point:
            parts.append(self.point)
        if self.spectra_total:
            parts.append(f"spectra {self.spectra_done}/{self.spectra_total}")
        parts.append(f"elapsed {_duration(time.monotonic() - self.started)}")
        eta = self.eta_s()
        if self.points_done < self.points_planned:  # the look-elsewhere has no estimate
            parts.append("ETA " + ("after the first point" if eta is None else _duration(eta)))
        return " | ".join(parts)


def _duration(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 3 min 05 s, 1 h 02 min."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class ScanContext:
    """The side effects a scan's nodes share: audit log, executor, policy, progress."""

    def __init__(
        self,
        config: ScanConfig,
        audit: AuditLog,
        fan_out: FanOut,
        *,
        policy: Policy | None = None,
        progress: Progress | None = None,
    ) -> None:
        self.config = config
        self.run_dir = Path(config.run_dir)
        self.audit = audit
        self.fan_out = fan_out
        self.policy: Policy = policy or RulesPolicy()
        self.rules = RulesPolicy()
        self.progress = progress or Progress()
        self.step_id = "-"
        self.recorded_dir: Path | None = None
        """Where the run folder was when its checkpoints were written (set on resume)."""
        self._events = 0
        self._cache: dict[str, Any] = {}

    def at(self, path: str | Path) -> Path:
        """A path recorded in the scan's state, in the run folder as it is now."""
        return locate_path(str(path), self.run_dir, self.recorded_dir)

    def relative(self, path: Path) -> str:
        """How the state records a path: relative inside the run folder, else absolute."""
        return (
            str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) else str(path)
        )

    def executor_event(self, message: str) -> None:
        """Log what the executor did on its own (a lost Ray batch run serially)."""
        self._events += 1
        self.audit.add(
            "decisions",
            f"{self.step_id}:executor:{self._events}",
            step_id=self.step_id,
            kind="executor",
            chosen="serial",
            policy="executor",
            rationale=message,
        )

    def cached(self, key: str, build: Callable[[], Any]) -> Any:
        """A value computed once per process (the event table, read once per scan)."""
        if key not in self._cache:
            self._cache[key] = build()
        return self._cache[key]

    def call_tools(
        self, step_id: str, tool: str, calls: Sequence[tuple[str, dict[str, Any]]]
    ) -> list[ToolResult]:
        """Run `tool` on every (label, input) through the executor and log each call.

        A relative path field of an input names a file of the run folder: it is logged as
        given (so a moved folder replays) and resolved against the run folder to run.
        """
        outputs = self.fan_out.map(
            run_tool, [(tool, relocate_paths(payload, self.run_dir, None)) for _, payload in calls]
        )
        results = []
        for (label, payload), outcome in zip(calls, outputs, strict=True):
            self.log_tool_call(step_id, label, tool, payload, outcome)
            results.append(ToolResult(label, outcome["output"], outcome["error"]))
        return results

    def log_tool_call(
        self,
        step_id: str,
        label: str,
        tool: str,
        payload: dict[str, Any],
        outcome: dict[str, Any],
    ) -> None:
        """One tool_calls row; an output above INLINE_OUTPUT_BYTES goes to a file."""
        output = outcome["output"]
        text = canonical_json(output if outcome["error"] is None else {"error": outcome["error"]})
        digest = sha256_text(text)
        output_path = None
        inline: str | None = text
        if len(text) > INLINE_OUTPUT_BYTES:
            folder = self.run_dir / "tool_outputs"
            folder.mkdir(exist_ok=True)
            path = folder / f"{digest}.json"
            path.write_text(text)
            output_path = str(path.relative_to(self.run_dir))
            inline = None
        self.audit.add(
            "tool_calls",
            f"{step_id}:{tool}:{label}",
            step_id=step_id,
            tool=tool,
            input=payload,
            input_sha256=sha256_text(canonical_json(payload)),
            output=inline,
            output_sha256=digest,
            output_path=output_path,
            seconds=round(float(outcome["seconds"]), 4),
            replayable=tool in REPLAYABLE_TOOLS,
            worker=outcome.get("worker"),
        )

    def artifact(self, path: Path, kind: str) -> str:
        """Log a file of the run folder with its SHA-256 and return the hash."""
        digest = sha256_file(path)
        relative = (
            str(path.relative_to(self.run_dir)) if path.is_relative_to(self.run_dir) else str(path)
        )
        self.audit.add(
            "artifacts",
            f"{relative}:{digest}",
            path=relative,
            sha256=digest,
            bytes=path.stat().st_size,
            kind=kind,
        )
        return digest


StepIds = Literal["per_node", "in_log"]
"""How a command numbers its step: "per_node" NODE-NN (NN the node's earlier steps: limits),
"in_log" NNNN-NODE-TIME (NNNN the log's earlier steps: acceptance, inject)."""


@dataclass
class CliStep:
    """One audited step of a command on a finished run: its context, id and summary."""

    ctx: ScanContext
    step_id: str
    summary: str = ""


@contextlib.contextmanager
def cli_step(run_dir: Path, node: str, *, step_ids: StepIds = "in_log") -> Iterator[CliStep]:
    """A command's step on the run folder: lock, audit log, serial context, `steps` row.

    The run folder is locked and its audit log opened; the block runs inside one audit
    transaction with a ScanContext (serial executor, the run's config with `run_dir` set to
    where the folder is now). On a normal exit the `steps` row (with `summary` as the block
    set it) is written with the block's rows; on an exception nothing of the step is written.
    """
    from agent.runtime.runlock import run_folder_lock

    config = read_config(run_dir)
    with run_folder_lock(run_dir, f"anomscan {node}"), FanOut("serial") as fan_out:
        audit = AuditLog(run_dir / "audit.sqlite")
        try:
            steps = audit.rows("steps")
            if step_ids == "per_node":
                step_id = f"{node}-{sum(1 for row in steps if row['node'] == node):02d}"
            else:
                step_id = f"{len(steps):04d}-{node}-{time.strftime('%Y%m%dT%H%M%S')}"
            ctx = ScanContext(config, audit, fan_out)
            ctx.step_id = step_id
            step = CliStep(ctx, step_id)
            started = time.time()
            with audit.transaction():
                yield step
                ended = time.time()
                audit.add(
                    "steps",
                    step_id,
                    step_id=step_id,
                    node=node,
                    point_pb=None,
                    started_at=round(started, 3),
                    ended_at=round(ended, 3),
                    seconds=round(ended - started, 3),
                    summary=step.summary,
                )
        finally:
            audit.close()


def folder_sha256(folder: Path, pattern: str = "*.parquet") -> str:
    """One hash for a folder of parts: SHA-256 over the sorted (name, part hash) pairs."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob(pattern)):
        digest.update(f"{path.name}:{sha256_file(path)}\n".encode())
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a unique temporary file and a rename."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.partial")
    temporary.write_text(text)
    temporary.replace(path)


RESULT_COLUMNS = (
    "spectrum",
    "xsec_pb",
    "window_lo_gev",
    "window_hi_gev",
    "data",
    "background",
    "local_p",
    "local_z",
    "global_z",
    "scan_global_z",
    "function",
    "checks_passed",
    "whole_stream",
    "repeated_at_pb",
)
"""results.csv columns; `repeated_at_pb` holds the tighter whole-stream points a row stands
for, separated by spaces."""


def distinct_excesses(excesses: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct excess: a spectrum's windows that overlap are one excess.

    `excesses` sorted by local Z (as in results.json); each row returned is the excess at
    the AR point where its local Z is largest, with `points_pb`, every AR point (pb,
    ascending) where the excess appears, whole-stream repeats included.
    """
    rows: list[dict[str, Any]] = []
    for excess in excesses:
        low, high = excess["window_gev"]
        points = [excess["xsec_pb"], *(excess.get("repeated_at_pb") or [])]
        same = next(
            (
                row
                for row in rows
                if row["spectrum"] == excess["spectrum"]
                and low < row["window_gev"][1]
                and row["window_gev"][0] < high
            ),
            None,
        )
        if same is None:
            rows.append(excess | {"points_pb": sorted(points)})
        else:
            same["points_pb"] = sorted({*same["points_pb"], *points})
    return rows


def write_results(run_dir: Path, results: dict[str, Any]) -> tuple[Path, Path]:
    """RUN/results.json (everything) and RUN/results.csv (one row per excess)."""
    json_path = run_dir / RESULTS_JSON
    csv_path = run_dir / RESULTS_CSV
    write_atomic(json_path, json.dumps(results, indent=1))
    rows = []
    for excess in results["excesses"]:
        row = {key: excess.get(key) for key in RESULT_COLUMNS}
        row["window_lo_gev"], row["window_hi_gev"] = excess["window_gev"]
        row["repeated_at_pb"] = " ".join(f"{p:g}" for p in excess.get("repeated_at_pb") or [])
        rows.append(row)
    temporary = csv_path.with_name(f".{csv_path.name}.{os.getpid()}.partial")
    with temporary.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=RESULT_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    temporary.replace(csv_path)
    return json_path, csv_path


def iter_excesses(results: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The excesses of a results.json, most significant first."""
    yield from results["excesses"]


def _log_failure(audit: AuditLog, run_id: str, attempt: int, error: AnomscanError) -> None:
    """A `runs` row saying why the scan stopped (skipped when the log itself is unwritable)."""
    from agent.runtime.audit import AuditError

    if isinstance(error, AuditError):
        return
    with contextlib.suppress(AuditError):
        audit.add(
            "runs",
            f"run:failed:{attempt}",
            run_id=run_id,
            event="failed",
            config={"error": f"{type(error).__name__}: {error}"},
            versions=None,
            inputs=None,
            model_sha256=None,
            seed=None,
        )


STORAGE_ERRNOS = frozenset(
    {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}
)
"""OSError numbers of a full disk, a file size limit, a read-only or unwritable folder."""
_SQLITE_STORAGE_MESSAGES = (
    "disk is full",
    "disk i/o error",
    "readonly database",
    "unable to open database file",
)


def storage_fault(error: BaseException, run_dir: Path) -> StorageError | None:
    """A StorageError for a write that failed for lack of space or permission, else None.

    Covers the run folder's plain files (OSError) and its SQLite files (the checkpointer's
    sqlite3 errors), so a full disk or a read-only folder ends in one line that says how to
    continue, wherever in the graph the write happened.
    """
    import sqlite3

    if isinstance(error, OSError) and error.errno in STORAGE_ERRNOS:
        where = error.filename or run_dir
        what = error.strerror or str(error)
    elif isinstance(error, sqlite3.Error) and any(
        text in str(error).lower() for text in _SQLITE_STORAGE_MESSAGES
    ):
        where, what = run_dir, f"SQLite: {error}"
    else:
        return None
    return StorageError(
        f"cannot write in the run folder ({where}: {what}); free disk space or make "
        f"{run_dir} writable, then continue with `anomscan scan --resume {run_dir}`"
    )


class _ProgressLine:
    """A rich renderable that redraws the progress line on every refresh."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __rich__(self) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table

        grid = Table.grid(padding=(0, 1))
        progress = self.progress
        if progress.points_planned:
            done = f"{progress.points_done}/{progress.points_planned} points"
            bar = ProgressBar(total=1.0, completed=progress.fraction(), width=24)
            grid.add_row("[bold cyan]anomscan scan[/]", bar, done, progress.line())
        else:
            grid.add_row("[bold cyan]anomscan scan[/]", progress.line())
        return grid


@dataclass(frozen=True)
class ScanOutcome:
    """What a finished scan left: its results and where they are."""

    run_dir: Path
    results: dict[str, Any]
    executors: tuple[str, ...]


def make_policy(config: ScanConfig) -> Policy:
    """The scan's policy: `rules`, or the LLM one (endpoint from the config or environment)."""
    if config.policy == "rules":
        return RulesPolicy()
    from agent.policy.llm import LLMPolicy, LLMSettings

    settings = LLMSettings.from_environment(
        base_url=config.llm_base_url,
        model=config.llm_model,
        timeout_s=config.llm_timeout_s,
        max_rejections=config.llm_max_rejections,
        max_calls=config.llm_max_calls,
        max_tokens=config.llm_max_tokens,
    )
    inputs = resolve_inputs(config)
    declared = [] if inputs is None else [str(f) for f in inputs.files]
    return LLMPolicy(
        settings,
        Path(config.run_dir),
        declared_inputs=declared,
        point_budget=config.point_budget(),
    )


def run_scan(
    config: ScanConfig, *, resume: bool = False, show_progress: bool = True
) -> ScanOutcome:
    """Run (or resume) the scan of `config` in its run folder and return its results.

    The run folder is locked for the scan's whole life (`agent.runtime.runlock`): a second scan,
    resume, limits, injection or annotation of the same folder is refused (exit 2) before
    it writes anything. A new scan writes RUN/config.json under that lock (refused when the
    folder already holds a scan). A full disk or an unwritable run folder raises
    StorageError (one line, exit 2); what was written stays consistent (audit rows go in
    per-step transactions, checkpoints per superstep), so `--resume` continues once the
    cause is fixed.
    """
    import sqlite3

    from agent.runtime.runlock import run_folder_lock

    run_dir = Path(config.run_dir)
    try:
        with run_folder_lock(run_dir, "anomscan scan --resume" if resume else "anomscan scan"):
            if not resume:
                write_config(config)
            return _run_scan(config, resume=resume, show_progress=show_progress)
    except (OSError, sqlite3.Error) as error:
        fault = storage_fault(error, run_dir)
        if fault is None:
            raise
        raise fault from error


def _run_scan(config: ScanConfig, *, resume: bool, show_progress: bool) -> ScanOutcome:
    import sqlite3

    from langgraph.checkpoint.sqlite import SqliteSaver

    from agent.scan.graph import build_graph, recursion_limit

    run_dir = Path(config.run_dir)
    run_id = run_dir.resolve().name
    audit = AuditLog(run_dir / "audit.sqlite")
    progress = Progress()
    with contextlib.ExitStack() as stack:
        stack.callback(audit.close)
        fan_out = stack.enter_context(FanOut(config.executor))
        policy = make_policy(config)
        ctx = ScanContext(config, audit, fan_out, policy=policy, progress=progress)
        fan_out.on_event = ctx.executor_event
        previous = list(audit.rows("runs"))
        event = "resume" if resume else "start"
        audit.add(
            "runs",
            f"run:{event}:{len(previous)}",
            run_id=run_id,
            event=event,
            config=config.model_dump(mode="json"),
            versions=package_versions(),
            inputs=None,
            model_sha256=None,
            seed=config.seed,
            prompts=policy.prompts_sha256(),
        )
        connection = sqlite3.connect(run_dir / CHECKPOINT_FILE, check_same_thread=False)
        stack.callback(connection.close)
        graph = build_graph(ctx).compile(checkpointer=SqliteSaver(connection))
        thread = {
            "configurable": {"thread_id": run_id},
            "recursion_limit": recursion_limit(config.point_budget()),
        }
        initial: dict[str, Any] | None = {
            "run_id": run_id,
            "run_dir": str(run_dir),
            "step": 0,
            "started_at": time.time(),
            "points": [],
            "pending_pb": [],
            "fallbacks_used": 0,
            "refinement_rounds": 0,
            "current": None,
            "lee": None,
        }
        final: dict[str, Any] | None = None
        if resume:
            snapshot = graph.get_state(thread)  # type: ignore[arg-type]
            if snapshot.values.get("run_dir"):
                ctx.recorded_dir = Path(snapshot.values["run_dir"])
            if snapshot.values and not snapshot.next:
                final = dict(snapshot.values)
            elif snapshot.values:
                initial = None
        if show_progress:
            from rich.console import Console
            from rich.live import Live

            console = Console(stderr=True)
            live = stack.enter_context(
                Live(_ProgressLine(progress), console=console, refresh_per_second=2, transient=True)
            )
            progress.callback = lambda _: live.refresh()
        if final is None:
            try:
                final = graph.invoke(initial, thread, durability="sync")  # type: ignore[call-overload]
            except AnomscanError as error:
                _log_failure(audit, run_id, len(previous), error)
                raise
            except (OSError, sqlite3.Error) as error:
                fault = storage_fault(error, run_dir)
                if fault is None:
                    raise
                _log_failure(audit, run_id, len(previous), fault)
                raise fault from error
        audit.add(
            "runs",
            f"run:finish:{len(previous)}",
            run_id=run_id,
            event="finish",
            config=None,
            versions=None,
            inputs=final.get("inputs"),
            model_sha256=final.get("model_sha256"),
            seed=config.seed,
        )
        executors = tuple(sorted(fan_out.used))
    results = json.loads((run_dir / RESULTS_JSON).read_text())
    return ScanOutcome(run_dir, results, executors)
