"""The injection's signal pool: generated X -> pair events scored with the run's model.

`generate_sample` makes the events (Gaussian lineshape, the generator's extra objects, no
background) and `core.reinterp.score_sample` runs them through the run's selection, RMM and
autoencoder. Toy t of every strength takes its events from block t of the pool (blocks are
disjoint), so toys differ in the events injected; a block holds the largest strength's
Poisson mean plus five standard deviations.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.reinterp.calls import call_logged
from agent.reinterp.request import InjectionRequest
from agent.scan import ScanContext
from core.errors import InvalidInputError
from core.masses import PAIRS, STREAMS
from core.reinterp import correctly_paired, score_sample, signal_sigma_gev
from core.table import EventTable
from tools.reinterp import RunInputs

BoolArray = npt.NDArray[np.bool_]

MAX_POOL_EVENTS = 5_000_000
"""Most signal events one injection generates (toys x the largest strength's block)."""

MIN_STREAM_FRACTION = 0.05
"""Without --stream, the streams whose spectrum of the pair gets at least this fraction of
the generated events (with the pair of the decay) are analysed."""


@dataclass(frozen=True)
class SignalPool:
    """Generated, scored signal events (rows of an event table) and whether each is paired."""

    table: EventTable
    paired: BoolArray
    block: int

    def rows(self, toy: int, count: int) -> npt.NDArray[np.int64]:
        """The first `count` rows of toy `toy`'s block (blocks are disjoint)."""
        start = toy * self.block
        return np.arange(start, start + min(count, self.block), dtype=np.int64)


def generate_signal_pool(
    ctx: ScanContext,
    step_id: str,
    run: RunInputs,
    request: InjectionRequest,
    folder: Path,
    lumi_search: float,
) -> SignalPool:
    """Generate the pool (RUN/injection/NAME/signal/) and score it with the run's model.

    Block = the largest strength's mean + 5 sqrt(mean) + 10 events per toy; InvalidInputError
    when the toys need more than MAX_POOL_EVENTS. Rows are ordered by event number.
    """
    sigma = signal_sigma_gev(request.mass, request.width)
    largest = max(request.xsec_pb) * lumi_search
    block = math.ceil(largest + 5.0 * math.sqrt(largest) + 10.0)
    if block * request.toys > MAX_POOL_EVENTS:
        raise InvalidInputError(
            f"--xsec {max(request.xsec_pb):g} pb x {lumi_search:.4g} pb^-1 x --toys "
            f"{request.toys} needs {block * request.toys} generated events, more than "
            f"{MAX_POOL_EVENTS}; lower the largest cross-section or the number of toys"
        )
    payload = {
        "output_dir": str(folder / "signal"),
        "n_events": 0,
        "seed": request.seed,
        "lumi_pb": run.lumi_pb,
        "signals": [
            {
                "pair": request.pair,
                "mass": request.mass,
                "width": sigma,
                "n_events": block * request.toys,
                "extra": dict(request.extra),
                "lineshape": "gaussian",
            }
        ],
    }
    generated = call_logged(ctx, step_id, "signal pool", "generate_sample", payload)
    table = score_sample(
        generated["files"],
        run.model,
        folder / "signal-events.parquet",
        schema="nanoaod",
        selection=run.selection,
    )
    truth = json.loads(Path(generated["truth"]).read_text())["truth"][0]
    true_mass = dict(zip(truth["events"], truth["true_mass"], strict=True))
    order = np.argsort(table.event, kind="stable")
    table = take_rows(table, order)
    masses = table.masses[:, PAIRS.index(request.pair)]
    truth_of_row = np.array([true_mass[int(e)] for e in table.event], dtype=np.float64)
    return SignalPool(table, correctly_paired(masses, truth_of_row), block)


def reached_streams(pool: SignalPool, request: InjectionRequest, inside: list[str]) -> list[str]:
    """The streams (among those whose fit range holds the mass) the signal reaches."""
    column = PAIRS.index(request.pair)
    has_pair = pool.paired & np.isfinite(pool.table.masses[:, column])
    fractions = {
        stream: float(np.mean(has_pair & pool.table.stream_bits[:, STREAMS.index(stream)]))
        for stream in inside
    }
    reached = [stream for stream in inside if fractions[stream] >= MIN_STREAM_FRACTION]
    if not reached:
        raise InvalidInputError(
            f"the generated X({request.mass:g}) -> {request.pair} reaches none of the streams "
            f"{inside} with {MIN_STREAM_FRACTION:.0%} of its events ("
            + ", ".join(f"{s} {f:.1%}" for s, f in fractions.items())
            + "); choose --stream, or --extra objects that fire a trigger"
        )
    return reached


def take_rows(table: EventTable, rows: npt.NDArray[np.int64]) -> EventTable:
    """A new table of the given rows of `table` (every column, in the order of `rows`)."""

    def pick(value: Any) -> Any:
        return None if value is None else np.asarray(value)[rows]

    return EventTable(
        event=table.event[rows],
        run=table.run[rows],
        weight=table.weight[rows],
        stream_bits=table.stream_bits[rows],
        masses=table.masses[rows],
        score=pick(table.score),
        lumi_block=pick(table.lumi_block),
        source_id=pick(table.source_id),
        key=pick(table.key),
        training=pick(table.training),
    )
