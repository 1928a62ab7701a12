"""The typed state of a scan: configuration, AR points, small summaries, paths and hashes.

LangGraph checkpoints the whole state after every superstep, so it never holds arrays:
spectra, backgrounds and per-spectrum results live in NPZ/JSON files in the run folder,
and the state keeps their paths and SHA-256.
"""

from __future__ import annotations

from typing import Any, TypedDict


class PointRecord(TypedDict):
    """One scanned AR point: where its spectra and results are, and each spectrum's outcome."""

    index: int
    point_pb: float
    spectra_file: str
    spectra_sha256: str
    results_file: str
    results_sha256: str
    outcomes: dict[str, dict[str, Any]]
    """spectrum -> {"status": "excess" | "no background" | "skipped", "local_z": float|None}"""


class ScanState(TypedDict, total=False):
    """The scan's state between graph nodes."""

    run_id: str
    run_dir: str
    step: int
    """Number of node executions so far: the step ids of the audit are derived from it."""
    stage: str
    started_at: float
    lumi_pb: float
    inputs: dict[str, str]
    """input file -> SHA-256"""
    n_events: int
    """Events in the event table (after the selection; the scan's real event count)."""
    input_notes: list[str]
    """What the reader says about the inputs (non-finite values read and dropped)."""
    table: str
    table_sha256: str
    model: str
    model_sha256: str
    pending_pb: list[float]
    """AR points proposed and not yet scanned, in scan order."""
    current: dict[str, Any] | None
    """The point being scanned: index, point_pb, spectra_file, skipped, candidates file."""
    points: list[PointRecord]
    fallbacks_used: int
    refinement_rounds: int
    stop_reason: str
    lee: dict[str, Any] | None
    results_file: str
    limits_file: str
    """RUN/limits.json when the scan ran with --limits."""
