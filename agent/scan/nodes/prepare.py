"""The `prepare` node: the inputs, the autoencoder and the event table, each logged.

The inputs are the given files (hashed as `input` artifacts) or the built-in synthetic
sample (the `generate_sample` tool, seeded by the scan). The autoencoder is the one given
with --model, refused at once when it does not load, or trained on 1 % of the events
(`train_autoencoder`). One event pass then writes the scored event table (RUN/events):
every later node cuts that table and never reads the ROOT files again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from agent.runtime.eventpass import PassSpec, PassSummary, event_pass
from agent.scan.config import BUILTIN_EVENTS, Inputs, resolve_inputs
from agent.scan.context import ScanContext, folder_sha256
from agent.scan.nodes.common import record_decision
from agent.scan.state import ScanState
from core.autoencoder import ModelCard, load_scorer, read_model_card
from core.errors import AnomscanError, InvalidInputError, ModelError
from core.events import non_finite_note
from core.synth import DEMO_SIGNALS

__all__ = ["prepare_node"]

MAX_TRAINING_THREADS = 16
"""Torch threads of the scan's training at most (its 1287-800-... layers gain little beyond)."""

FP32_REASON = (
    "scored in fp32: an int8 copy of the model scores 2-3x faster here but selects other AR "
    "events (per-stream overlap with fp32 0.95 at 1 pb, 0.84-0.88 at 3-31 pb; "
    "bench/results/autoencoder.json), below the 0.99 at every point that int8 would need"
)
"""Why the scan scores with the model's float32 weights (the event_pass decision says so)."""


def prepare_node(ctx: ScanContext, state: ScanState, step_id: str) -> dict[str, Any]:
    """Resolve the inputs, load or train the autoencoder, and write the scored event table."""
    run_dir = ctx.run_dir
    inputs = resolve_inputs(ctx.config)
    if inputs is None:
        inputs = _builtin_sample(ctx, step_id)
    files = list(inputs.files)
    hashes = {}
    for file in files:
        path = Path(file)
        hashes[file] = ctx.artifact(path, "input") if path.is_file() else "remote"
    record_decision(
        ctx,
        step_id,
        "inputs",
        chosen={"files": len(files), "lumi_pb": inputs.lumi_pb, "schema": inputs.schema},
        options={"source": inputs.source},
        policy="config",
        rationale=(
            f"{len(files)} file(s) from {inputs.source}; luminosity {inputs.lumi_pb:g} pb^-1"
        ),
    )
    model_path, model_source = _model(ctx, step_id, files, inputs.schema)
    card = read_model_card(model_path)
    model_hash = ctx.artifact(model_path, "model")
    summary = _event_pass(ctx, files, inputs.schema, model_path)
    table_hash = folder_sha256(run_dir / "events")
    for part in sorted((run_dir / "events").glob("*.parquet")):
        ctx.artifact(part, "event table part")
    note = non_finite_note(summary.non_finite, summary.dropped_non_finite)
    _record_event_pass(ctx, step_id, summary, card, model_source, note)
    return {
        "stage": "prepared",
        "n_events": summary.n_events,
        "input_notes": [note] if note else [],
        "lumi_pb": inputs.lumi_pb,
        "inputs": hashes,
        "model": ctx.relative(model_path),
        "model_sha256": model_hash,
        "table": ctx.relative(run_dir / "events"),
        "table_sha256": table_hash,
    }


def _builtin_sample(ctx: ScanContext, step_id: str) -> Inputs:
    """Generate the built-in synthetic sample (background and the demo signals) in RUN/data."""
    config = ctx.config
    signals = [
        {
            "pair": s.pair,
            "mass": s.mass,
            "width": s.width,
            "n_events": s.n_events,
            "extra": dict(s.extra),
        }
        for s in DEMO_SIGNALS
    ]
    payload = {
        "output_dir": str(ctx.run_dir / "data"),
        "n_events": config.events or BUILTIN_EVENTS,
        "seed": config.seed,
        "signals": signals,
    }
    (generated,) = ctx.call_tools(step_id, "generate_sample", [("built-in sample", payload)])
    if generated.output is None:
        raise AnomscanError(f"generating the built-in sample failed: {generated.error}")
    return Inputs(
        tuple(generated.output["files"]),
        float(generated.output["lumi_pb"]),
        "nanoaod",
        "built-in synthetic sample",
    )


def _model(ctx: ScanContext, step_id: str, files: list[str], schema: str) -> tuple[Path, str]:
    """The autoencoder: loaded from --model (checked) or trained on 1 % of the events."""
    config = ctx.config
    if config.model is not None:
        path = Path(config.model)
        if not path.is_file():
            raise InvalidInputError(f"model {path} does not exist; give an .onnx from a scan")
        try:
            read_model_card(path)
            load_scorer(path)
        except ModelError:
            raise
        except Exception as error:
            raise ModelError(
                f"the autoencoder {path} failed to load ({type(error).__name__}: {error}); "
                "give a model exported by anomscan, or leave out --model to train one"
            ) from error
        return path, f"loaded {path}"
    output = ctx.run_dir / "model" / "autoencoder.onnx"
    output.parent.mkdir(exist_ok=True)
    ctx.progress.update(stage="training the autoencoder")
    payload = {
        "inputs": files,
        "schema": schema,
        "output": str(output),
        "seed": config.seed,
        "fraction": 0.01,
        "max_epochs": config.epochs,
        # every core: 1.8x faster on 2 cores than on 1, with scores equal to the bit on this
        # machine; the count is in the logged call, so a replay trains alike
        "threads": min(os.cpu_count() or 1, MAX_TRAINING_THREADS),
    }
    (trained,) = ctx.call_tools(step_id, "train_autoencoder", [("autoencoder", payload)])
    if trained.output is None:
        raise ModelError(f"training the autoencoder failed: {trained.error}")
    return output, f"trained on {trained.output['n_training_events']} events"


def _event_pass(ctx: ScanContext, files: list[str], schema: str, model_path: Path) -> PassSummary:
    """Score every event and write the event table RUN/events (on Ray when the scan may)."""
    ctx.progress.update(stage="event pass")
    if ctx.fan_out.kind in ("ray", "auto"):
        ctx.fan_out.start_ray()  # one session for the event pass and the fits
    executor = (
        "ray" if ctx.fan_out.kind == "ray" else ("auto" if ctx.fan_out.kind == "auto" else "serial")
    )
    return event_pass(
        files,
        ctx.run_dir / "events",
        PassSpec(schema=schema, model=str(model_path)),
        executor=executor,  # type: ignore[arg-type]
    )


def _record_event_pass(
    ctx: ScanContext,
    step_id: str,
    summary: PassSummary,
    card: ModelCard,
    model_source: str,
    note: str | None,
) -> None:
    """The `event_pass` decision: events scored, per stream, and the model that scored them."""
    record_decision(
        ctx,
        step_id,
        "event_pass",
        chosen={
            "n_events": summary.n_events,
            "stream_counts": summary.stream_counts,
            "non_finite": summary.non_finite,
            "dropped_non_finite": summary.dropped_non_finite,
            "precision": "fp32" if card.quantization == "none" else card.quantization,
        },
        options={"executor": summary.executor, "model": model_source},
        policy="config",
        rationale=(
            f"{summary.n_events} events scored with the autoencoder ({model_source}, card "
            f"seed {card.seed}, trained on {card.fraction:.0%}) in {summary.seconds:.1f} s "
            f"({summary.executor}); "
            + (FP32_REASON if card.quantization == "none" else f"{card.quantization} model given")
            + (f"; {note}" if note else "")
        ),
    )
