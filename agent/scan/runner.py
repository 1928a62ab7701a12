"""Run (or resume) a scan: the run folder locked, the graph compiled with its checkpointer.

A run folder holds config.json, data/ (a generated sample), model/, events/ (the event
table), spectra/ and points/ (per AR point: histograms, backgrounds, results), lee/, the
audit log audit.sqlite, LangGraph's checkpoints.sqlite, results.json and results.csv.

The folder is locked for the scan's whole life, so a second scan, resume, limits,
injection or annotation of it is refused before it writes anything. A full disk or an
unwritable folder ends in one line (StorageError) that says how to continue: audit rows
go in per-step transactions and checkpoints per superstep, so what was written stays
consistent and `--resume` continues once the cause is fixed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.graph.state import CompiledStateGraph
from rich.console import Console
from rich.live import Live

from agent.policy.protocol import Policy
from agent.policy.rules import RulesPolicy
from agent.runtime.audit import AuditError, AuditLog
from agent.runtime.executor import FanOut
from agent.runtime.runlock import run_folder_lock
from agent.scan.config import (
    CHECKPOINT_FILE,
    RESULTS_JSON,
    ScanConfig,
    package_versions,
    resolve_inputs,
    write_config,
)
from agent.scan.context import ScanContext
from agent.scan.graph import build_graph, recursion_limit
from agent.scan.plan import PLAN_EVENT, data_record, plan_record
from agent.scan.progress import Progress, ProgressLine
from agent.scan.state import ScanState
from core.errors import AnomscanError, OutputError, StorageError

__all__ = ["STORAGE_ERRNOS", "ScanOutcome", "make_policy", "run_scan", "storage_fault"]

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
    # the LLM package (openai) is loaded only for a scan that uses it
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


def storage_fault(error: BaseException, run_dir: Path) -> StorageError | None:
    """A StorageError for a write that failed for lack of space or permission, else None.

    Covers the run folder's plain files (an OSError, or the OutputError `core.files` raised
    from one) and its SQLite files (the checkpointer's sqlite3 errors), so a full disk or a
    read-only folder ends in one line that says how to continue, wherever in the graph the
    write happened.
    """
    if isinstance(error, OutputError) and isinstance(error.__cause__, OSError):
        error = error.__cause__
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
    run_dir = Path(config.run_dir)
    try:
        with run_folder_lock(run_dir, "anomscan scan --resume" if resume else "anomscan scan"):
            if not resume:
                write_config(config)
            return _run_locked(config, resume=resume, show_progress=show_progress)
    except (OSError, sqlite3.Error) as error:
        fault = storage_fault(error, run_dir)
        if fault is None:
            raise
        raise fault from error


def _run_locked(config: ScanConfig, *, resume: bool, show_progress: bool) -> ScanOutcome:
    """The scan in its locked run folder: `runs` rows, the graph run to its end, the results."""
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
        attempt = len(list(audit.rows("runs")))
        event = "resume" if resume else "start"
        # the procedure and the data, before anything is read (agent.scan.plan)
        audit.add(
            "runs",
            f"run:{PLAN_EVENT}:{attempt}",
            run_id=run_id,
            event=PLAN_EVENT,
            config=plan_record(config, policy.prompts_sha256()),
            versions=package_versions(),
            inputs=data_record(config),
            model_sha256=None,
            seed=config.seed,
            prompts=policy.prompts_sha256(),
        )
        audit.add(
            "runs",
            f"run:{event}:{attempt}",
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
        initial, final = _starting_point(graph, thread, ctx, resume=resume)
        if show_progress:
            live = stack.enter_context(
                Live(
                    ProgressLine(progress),
                    console=Console(stderr=True),
                    refresh_per_second=2,
                    transient=True,
                )
            )
            progress.callback = lambda _: live.refresh()
        if final is None:
            final = _invoke(graph, initial, thread, ctx, attempt)
        audit.add(
            "runs",
            f"run:finish:{attempt}",
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


def _starting_point(
    graph: CompiledStateGraph[ScanState],
    thread: dict[str, Any],
    ctx: ScanContext,
    *,
    resume: bool,
) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """(graph input, final state): a new state; on resume None (go on from the checkpoint).

    A resumed scan whose checkpoint is already past its last node is not run again: its
    final state is returned. On resume the context learns where the run folder was when
    its checkpoints were written, to find the files the state names in the folder now.
    """
    initial: dict[str, Any] = {
        "run_id": thread["configurable"]["thread_id"],  # the run folder's name
        "run_dir": str(ctx.run_dir),
        "step": 0,
        "started_at": time.time(),
        "points": [],
        "pending_pb": [],
        "fallbacks_used": 0,
        "refinement_rounds": 0,
        "current": None,
        "lee": None,
    }
    if not resume:
        return initial, None
    snapshot = graph.get_state(thread)  # type: ignore[arg-type]
    if snapshot.values.get("run_dir"):
        ctx.recorded_dir = Path(snapshot.values["run_dir"])
    if snapshot.values and not snapshot.next:
        return initial, dict(snapshot.values)
    if snapshot.values:
        return None, None
    return initial, None


def _invoke(
    graph: CompiledStateGraph[ScanState],
    initial: dict[str, Any] | None,
    thread: dict[str, Any],
    ctx: ScanContext,
    attempt: int,
) -> dict[str, Any]:
    """Run the graph to its end; a failure is logged as a `runs` row before it is raised.

    A write that failed for lack of space or permission is raised as the StorageError of
    `storage_fault` (one line that says how to continue).
    """
    run_id = thread["configurable"]["thread_id"]
    try:
        final: dict[str, Any] = graph.invoke(initial, thread, durability="sync")  # type: ignore[call-overload]
    except (AnomscanError, OSError, sqlite3.Error) as error:
        fault = storage_fault(error, ctx.run_dir)
        if fault is not None:
            _log_failure(ctx.audit, run_id, attempt, fault)
            raise fault from error
        if isinstance(error, AnomscanError):
            _log_failure(ctx.audit, run_id, attempt, error)
        raise
    return final


def _log_failure(audit: AuditLog, run_id: str, attempt: int, error: AnomscanError) -> None:
    """A `runs` row saying why the scan stopped (skipped when the log itself is unwritable)."""
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
