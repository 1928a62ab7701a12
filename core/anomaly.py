"""Anomaly regions: the events of a stream above an autoencoder-score cut set by a cross-section.

An anomaly region (AR) at effective cross-section sigma (pb) keeps the N = round(sigma * L)
highest-scoring events of a stream, L = L_search = (1 - f) L_int the luminosity (pb^-1) of
the events left for the search once the training fraction f is removed (PHYSICS.md sec. 4):
the events whose score is above the cut, `score > cut`. Exactly N events pass: should events
share the cut score, the ones needed to reach N are taken in increasing event id (or
position when no ids are given), so the selection is reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError

if TYPE_CHECKING:
    from core.table import EventTable

XSEC_MIN_PB: Final = 0.001
"""Lowest effective cross-section of the AR sweep, pb."""

XSEC_MAX_PB: Final = 100.0
"""Highest effective cross-section of the AR sweep, pb."""

ATLAS_XSEC_POINTS_PB: Final = (10.0, 1.0, 0.1)
"""The three ARs of the ATLAS search (PRL 132 081801), pb."""

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]


@dataclass(frozen=True)
class AnomalyRegion:
    """The events of one stream that pass the score cut of an effective cross-section.

    Events with `score > cut` pass; `cut` is the highest score of a stream event that does
    not pass (-inf when the whole stream passes). Only when scores tie at the cut do
    `n_pass_at_cut` events with score == cut pass too, by the tie-break, so that `n_pass`
    is exact; `selected` is the mask over all events. `whole_stream` says the requested
    count reached the stream size, so the AR is the whole stream.
    """

    xsec_pb: float
    lumi_pb: float
    n_requested: int
    n_stream: int
    n_pass: int
    cut: float
    whole_stream: bool
    n_pass_at_cut: int
    selected: BoolArray = field(repr=False, compare=False)

    @property
    def effective_xsec_pb(self) -> float:
        """Cross-section actually selected, n_pass / L in pb (below `xsec_pb` if whole stream)."""
        return self.n_pass / self.lumi_pb


def requested_count(xsec_pb: float, lumi_pb: float) -> int:
    """N = round(sigma * L), halves rounded up; sigma in pb, L in pb^-1."""
    _check_positive("xsec_pb", xsec_pb, "pb")
    _check_positive("lumi_pb", lumi_pb, "pb^-1")
    return math.floor(xsec_pb * lumi_pb + 0.5)


def anomaly_region(
    scores: npt.ArrayLike,
    xsec_pb: float,
    lumi_pb: float,
    *,
    in_stream: npt.ArrayLike | None = None,
    event_ids: npt.ArrayLike | None = None,
    training_fraction: float = 0.0,
) -> AnomalyRegion:
    """Select exactly N = round(xsec_pb * L_search) highest-score events of a stream.

    L_search = (1 - `training_fraction`) `lumi_pb`: the luminosity of the events left once
    the autoencoder's training events are removed (PHYSICS.md 4).

    Parameters
    ----------
    scores
        Anomaly score per event, ln(MSE); must be finite.
    xsec_pb, lumi_pb
        Effective cross-section in pb and integrated luminosity in pb^-1.
    in_stream
        Boolean mask of the events in the stream; all events when omitted.
    event_ids
        Event ids for the tie-break (increasing id wins); position when omitted.

    Returns
    -------
    AnomalyRegion
        The cut, the counts and the boolean mask `selected` over all events.
    """
    values = _finite_scores(scores)
    stream = _stream_mask(in_stream, len(values))
    ids = _tie_break_keys(event_ids, len(values))
    n_requested = requested_count(xsec_pb, luminosity_after_training(lumi_pb, training_fraction))

    positions = np.flatnonzero(stream)
    stream_scores = values[positions]
    n_stream = len(positions)
    selected = np.zeros(len(values), dtype=np.bool_)
    n_pass = min(n_requested, n_stream)
    n_pass_at_cut = 0
    if n_pass == n_stream:
        selected[positions] = True
        cut = -math.inf
    else:
        rank = n_stream - n_pass - 1
        cut = float(np.partition(stream_scores, rank)[rank])
        above = stream_scores > cut
        selected[positions[above]] = True
        n_pass_at_cut = n_pass - int(np.count_nonzero(above))
        if n_pass_at_cut:
            tied = np.flatnonzero(stream_scores == cut)
            tie_order = np.lexsort((positions[tied], ids[positions[tied]]))
            selected[positions[tied[tie_order[:n_pass_at_cut]]]] = True
    return AnomalyRegion(
        xsec_pb=float(xsec_pb),
        lumi_pb=float(luminosity_after_training(lumi_pb, training_fraction)),
        n_requested=n_requested,
        n_stream=n_stream,
        n_pass=n_pass,
        cut=cut,
        whole_stream=n_requested >= n_stream,
        n_pass_at_cut=n_pass_at_cut,
        selected=selected,
    )


def stream_anomaly_regions(
    table: EventTable,
    xsec_pb: float,
    lumi_pb: float,
    exclude: npt.NDArray[np.bool_],
    training_fraction: float | None = None,
) -> list[AnomalyRegion]:
    """The anomaly region of every stream (in STREAMS order) at `xsec_pb` (pb).

    Events in `exclude` (the autoencoder's training events) never enter. `training_fraction`
    f of L_search = (1 - f) L defaults to the fraction of `exclude`d rows (a table with rows
    added, e.g. injected events, passes the run's own f).
    """
    if table.score is None:
        raise InvalidInputError("the event table has no score column; run the scored event pass")
    if training_fraction is None:
        training_fraction = float(np.mean(exclude)) if exclude.size else 0.0
    return [
        anomaly_region(
            table.score,
            xsec_pb,
            lumi_pb,
            in_stream=table.stream_bits[:, k] & ~exclude,
            event_ids=table.keys(),
            training_fraction=training_fraction,
        )
        for k in range(table.stream_bits.shape[1])
    ]


def stream_regions(
    table: EventTable, xsec_pb: float, lumi_pb: float, exclude: npt.NDArray[np.bool_]
) -> tuple[BoolArray, list[bool]]:
    """Per stream, the events of its anomaly region (n, 7) and whether it is the whole stream.

    The regions of `stream_anomaly_regions` at `xsec_pb` (pb) as one mask column per stream:
    N = sigma x L_search events, L_search = (1 - f) L (pb^-1) with f the fraction of events
    in `exclude` (the autoencoder's training events, PHYSICS.md 4).
    """
    regions = stream_anomaly_regions(table, xsec_pb, lumi_pb, exclude)
    masks = np.zeros(table.stream_bits.shape, dtype=bool)
    for k, region in enumerate(regions):
        masks[:, k] = region.selected
    return masks, [region.whole_stream for region in regions]


def luminosity_after_training(lumi_pb: float, training_fraction: float) -> float:
    """L_search = (1 - f) L in pb^-1: the luminosity left once a fraction f is trained on."""
    _check_positive("lumi_pb", lumi_pb, "pb^-1")
    if not (math.isfinite(training_fraction) and 0.0 <= training_fraction < 1.0):
        raise InvalidInputError(
            f"training_fraction must lie in [0, 1), got {training_fraction}; it is the fraction "
            "of events the autoencoder was trained on"
        )
    return lumi_pb * (1.0 - training_fraction)


def cut_for_xsec(
    scores: npt.ArrayLike,
    xsec_pb: float,
    lumi_pb: float,
    *,
    in_stream: npt.ArrayLike | None = None,
) -> float:
    """Return the score cut of the AR at `xsec_pb` (pb) for `lumi_pb` (pb^-1)."""
    return anomaly_region(scores, xsec_pb, lumi_pb, in_stream=in_stream).cut


def xsec_for_cut(
    scores: npt.ArrayLike,
    cut: float,
    lumi_pb: float,
    *,
    in_stream: npt.ArrayLike | None = None,
) -> float:
    """Return the cross-section (pb) of the stream's events with score > `cut`: n / L."""
    values = _finite_scores(scores)
    stream = _stream_mask(in_stream, len(values))
    _check_positive("lumi_pb", lumi_pb, "pb^-1")
    if math.isnan(cut):
        raise InvalidInputError("the score cut is NaN; expected a number (or +-inf)")
    return int(np.count_nonzero(stream & (values > cut))) / lumi_pb


def anomaly_regions_per_stream(
    scores: npt.ArrayLike,
    streams: Mapping[str, npt.ArrayLike],
    xsec_pb: float,
    lumi_pb: float,
    *,
    event_ids: npt.ArrayLike | None = None,
) -> dict[str, AnomalyRegion]:
    """Return the AR of each stream (name -> boolean mask) at one cross-section (pb)."""
    return {
        name: anomaly_region(scores, xsec_pb, lumi_pb, in_stream=mask, event_ids=event_ids)
        for name, mask in streams.items()
    }


def point_text(xsec_pb: float) -> str:
    """An AR point (pb) as every output writes it: four significant digits (3.162, 0.001)."""
    return f"{xsec_pb:.4g}"


def log_uniform_xsec_grid(
    points_per_decade: int = 2,
    low_pb: float = XSEC_MIN_PB,
    high_pb: float = XSEC_MAX_PB,
) -> FloatArray:
    """Cross-sections (pb) spaced uniformly in log10 from `low_pb` to `high_pb`, both included.

    With the defaults the grid holds 0.001, 0.00316, ..., 100 pb, including the ATLAS points
    0.1, 1 and 10 pb exactly.
    """
    if points_per_decade < 1:
        raise InvalidInputError(
            f"points_per_decade must be >= 1, got {points_per_decade}; use e.g. 2 or 5"
        )
    _check_positive("low_pb", low_pb, "pb")
    _check_positive("high_pb", high_pb, "pb")
    if high_pb <= low_pb:
        raise InvalidInputError(
            f"the grid needs low_pb < high_pb, got {low_pb} pb and {high_pb} pb; swap them"
        )
    lo, hi = math.log10(low_pb), math.log10(high_pb)
    n_steps = max(1, math.ceil(round((hi - lo) * points_per_decade, 9)))
    exponents = np.round(np.linspace(lo, hi, n_steps + 1), 12)
    return np.asarray(np.power(10.0, exponents), dtype=np.float64)


def _check_positive(name: str, value: float, unit: str) -> None:
    if not (math.isfinite(value) and value > 0):
        raise InvalidInputError(f"{name} must be a positive finite number in {unit}, got {value}")


def _finite_scores(scores: npt.ArrayLike) -> FloatArray:
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1:
        raise InvalidInputError(
            f"scores must be a 1-d array (one per event), got shape {values.shape}"
        )
    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        raise InvalidInputError(
            f"{int(bad.sum())} anomaly scores are not finite (first at index {first}: "
            f"{values[first]}); rescore those events or drop them before building an AR"
        )
    return values


def _stream_mask(in_stream: npt.ArrayLike | None, n_events: int) -> BoolArray:
    if in_stream is None:
        return np.ones(n_events, dtype=np.bool_)
    mask = np.asarray(in_stream)
    if mask.dtype != np.bool_ or mask.shape != (n_events,):
        raise InvalidInputError(
            f"in_stream must be a boolean mask of shape ({n_events},) like the scores, "
            f"got dtype {mask.dtype} and shape {mask.shape}"
        )
    return mask


def _tie_break_keys(event_ids: npt.ArrayLike | None, n_events: int) -> npt.NDArray[np.int64]:
    if event_ids is None:
        return np.arange(n_events, dtype=np.int64)
    ids = np.asarray(event_ids)
    if ids.shape != (n_events,) or not np.issubdtype(ids.dtype, np.integer):
        raise InvalidInputError(
            f"event_ids must be integers of shape ({n_events},) like the scores, "
            f"got dtype {ids.dtype} and shape {ids.shape}"
        )
    return ids.astype(np.int64, copy=False)
