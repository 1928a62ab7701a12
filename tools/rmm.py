"""The `compute_rmm` tool: Rapidity-Mass Matrices of the selected events, written to NPZ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt
from pydantic import ConfigDict, Field, field_validator

from core.events import (
    SchemaName,
    load_events,
    non_finite_note,
    plan_read,
)
from core.files import exclusive_output
from core.objects import OBJECT_FIELDS, OBJECT_TYPES, EventChunk
from core.rmm import RMMLayout, rmm_features, rmm_matrices
from tools.common import NonFiniteReport, StrictModel, npz_output_path, save_npz
from tools.registry import FilePath, PathText, PositiveEventCount, SqrtSGeV, register


class ComputeRMMInput(StrictModel):
    """ROOT files to read (schema auto-detected by default) and the NPZ to write."""

    inputs: list[PathText] = Field(
        min_length=1, max_length=100_000, description="ROOT files: paths or URLs"
    )
    schema_name: SchemaName = Field("auto", alias="schema")
    max_events: PositiveEventCount | None = Field(None, description="read at most this many events")
    output: FilePath = Field(description="NPZ file to write (.npz)")
    sqrt_s: SqrtSGeV = 13000.0

    _check_output = field_validator("output")(npz_output_path)


class ComputeRMMOutput(NonFiniteReport):
    """Where the RMMs went and how many events they cover."""

    model_config = ConfigDict(serialize_by_alias=True)

    output: Path
    n_events: int
    schema_name: str = Field(alias="schema")


def padded_objects(chunk: EventChunk, layout: RMMLayout) -> dict[str, npt.NDArray[np.float64]]:
    """The objects that enter the RMM, (n, block size) per type and field, NaN-padded (GeV)."""
    arrays: dict[str, npt.NDArray[np.float64]] = {}
    for name, size in zip(OBJECT_TYPES, layout.block_sizes, strict=True):
        collection = ak.pad_none(chunk.collection(name), size, axis=1, clip=True)
        for field in OBJECT_FIELDS:
            values = ak.to_numpy(ak.fill_none(collection[field], np.nan))
            arrays[f"{name}_{field}"] = np.asarray(values, dtype=np.float64).reshape(
                len(chunk), size
            )
    return arrays


@register(
    "compute_rmm",
    "Read ROOT files, select objects and write their Rapidity-Mass Matrices and RMM features "
    "(with the objects that went in) to an NPZ file.",
    ComputeRMMInput,
    ComputeRMMOutput,
)
def compute_rmm_tool(arguments: ComputeRMMInput) -> ComputeRMMOutput:
    """Compute the RMMs of the (first `max_events`) events of the inputs.

    The output is locked for the whole computation: a second writer of the same NPZ fails at
    once (OutputInUseError) instead of both reporting success for one file.
    """
    with exclusive_output(arguments.output, what="NPZ output"):
        return _compute_rmm(arguments)


def _compute_rmm(arguments: ComputeRMMInput) -> ComputeRMMOutput:
    schemas = sorted({plan_read(path, arguments.schema_name).schema for path in arguments.inputs})
    chunk = load_events(arguments.inputs, arguments.schema_name, arguments.max_events)
    layout = RMMLayout(sqrt_s=arguments.sqrt_s)
    matrices = rmm_matrices(chunk, layout=layout)
    met = np.where(chunk.met_pt < layout.met_threshold_gev, 0.0, chunk.met_pt)
    arrays: dict[str, npt.NDArray[Any]] = {
        "rmm": matrices,
        "features": rmm_features(matrices, layout=layout),
        "event": np.asarray(chunk.event, dtype=np.int64),
        "run": np.asarray(chunk.run, dtype=np.int64),
        "lumi_block": (
            np.zeros(len(chunk), dtype=np.int64)
            if chunk.lumi_block is None
            else np.asarray(chunk.lumi_block, dtype=np.int64)
        ),
        "key": chunk.keys(),
        **padded_objects(chunk, layout),
        "met_pt": np.asarray(met, dtype=np.float64),
        "met_phi": np.asarray(chunk.met_phi, dtype=np.float64),
    }
    save_npz(arguments.output, arrays)
    note = non_finite_note(chunk.non_finite, chunk.dropped_non_finite)
    return ComputeRMMOutput(
        output=arguments.output,
        n_events=len(chunk),
        schema=",".join(schemas),
        non_finite=dict(chunk.non_finite),
        dropped_non_finite=dict(chunk.dropped_non_finite),
        notes=[note] if note else [],
    )
