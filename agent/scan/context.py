"""The side effects a scan's nodes share: tool calls and their audit rows, artifacts, a cache.

Every tool the scan uses goes through `ScanContext.call_tools`: the calls run on the
executor (serial, processes or Ray), and the driver logs each one (tool, input JSON,
output JSON or its hash and file, duration, worker) in the audit, so that `anomscan replay`
re-runs exactly these. Paths in a logged input stay as given (relative inside the run
folder), so a copied or moved run folder still replays: `relocate_paths` finds the files
where the folder is now.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import ValidationError

from agent.policy.protocol import Policy
from agent.policy.rules import RulesPolicy
from agent.runtime.audit import INLINE_OUTPUT_BYTES, AuditLog, canonical_json, sha256_text
from agent.runtime.executor import FanOut
from agent.runtime.runlock import run_folder_lock
from agent.scan.config import ScanConfig, read_config
from agent.scan.progress import Progress
from core.errors import AnomscanError
from core.files import file_sha256, write_text
from tools.registry import get_tool

__all__ = [
    "REPLAYABLE_TOOLS",
    "CliStep",
    "ScanContext",
    "StepIds",
    "ToolResult",
    "cli_step",
    "folder_sha256",
    "locate_path",
    "relocate_paths",
    "run_tool",
]

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


def folder_sha256(folder: Path, pattern: str = "*.parquet") -> str:
    """One hash for a folder of parts: SHA-256 over the sorted (name, part hash) pairs."""
    digest = hashlib.sha256()
    for path in sorted(folder.glob(pattern)):
        digest.update(f"{path.name}:{file_sha256(path)}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class ToolResult:
    """The outcome of one logged tool call."""

    label: str
    output: dict[str, Any] | None
    error: str | None


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
            path = write_text(folder / f"{digest}.json", text, what="tool output")
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
        digest = file_sha256(path)
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
