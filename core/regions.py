"""Anomaly regions of an event table too large to hold: one ranking, every point in one pass.

The anomaly region of a stream at an effective cross-section sigma holds the
N = round(sigma L_search) search events of the stream (those the autoencoder was not
trained on) with the highest score, ties going to the lower event key
(`core.anomaly.anomaly_region`). The regions of all sigma are prefixes of one ranking per
stream, so the table is never held whole:

- `rank_streams` reads it once, in batches, and keeps per stream only its `depth` best
  (score, key) pairs (16 bytes each), `depth` being the N of the largest sigma that will be
  asked, with the number of search events per stream;
- `points_spectra` reads it once more and finds, per event and stream, the tightest of the
  requested points whose region holds it; cumulative sums over the points give every
  point's 63 spectra. `points_bootstrap` fills the Poisson-bootstrap replicas
  (`core.bootstrap`) of chosen spectra the same way.

Memory grows with `depth` and the batch size, not with the table; the spectra and replicas
equal those of the in-memory `core.anomaly.stream_regions`, `core.table.region_spectra` and
`core.bootstrap.bootstrap_spectra` exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numba
import numpy as np
import numpy.typing as npt

from core.anomaly import luminosity_after_training, requested_count
from core.bootstrap import add_replica_counts
from core.errors import InvalidInputError
from core.masses import PAIRS, SPECTRUM_NAMES, STREAMS, mass_bin_edges, mass_bins, mass_counts
from core.table import MASS_COLUMNS, SCORE_COLUMN, iter_table_columns, refuse_duplicate_events

__all__ = [
    "PointRegions",
    "ReplicaRequest",
    "StreamRanking",
    "points_bootstrap",
    "points_spectra",
    "rank_streams",
    "ranked_values",
    "search_spectrum",
]

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]
ExcludeFunction = Callable[[IntArray], BoolArray]
"""Event keys -> the events left out of every region (the autoencoder's training events)."""

BATCH_ROWS = 250_000
"""Rows read at a time: about 100 MB of columns and their bins, few enough calls to cost
nothing."""


@dataclass(frozen=True)
class PointRegions:
    """The anomaly regions of one point: events per stream, whole-stream flags, lowest scores.

    `lowest_score[k]` is the lowest score inside stream k's region (None when it is empty):
    events at or above it pass, down to the tie-break.
    """

    xsec_pb: float
    n_pass: tuple[int, ...]
    whole_stream: tuple[bool, ...]
    lowest_score: tuple[float | None, ...]


@dataclass(frozen=True)
class StreamRanking:
    """Per stream, its `depth` best search events by score (highest first, ties by key).

    `n_search[k]` counts the stream's search events (all, not only those kept); a stream
    with at most `depth` of them keeps all. `n_excluded` of the table's `n_rows` rows were
    left out (trained on): their fraction f gives L_search = (1 - f) L.
    """

    scores: tuple[FloatArray, ...]
    keys: tuple[IntArray, ...]
    n_search: tuple[int, ...]
    n_rows: int
    n_excluded: int
    depth: int

    @property
    def training_fraction(self) -> float:
        """The fraction f of the table's events left out of the regions."""
        return self.n_excluded / self.n_rows if self.n_rows else 0.0

    def regions(self, xsec_pb: float, lumi_pb: float) -> PointRegions:
        """The regions at `xsec_pb` (pb) for the table's integrated luminosity `lumi_pb`."""
        lumi_search = luminosity_after_training(lumi_pb, self.training_fraction)
        n_requested = requested_count(xsec_pb, lumi_search)
        n_pass = [min(n_requested, n) for n in self.n_search]
        for k, n in enumerate(n_pass):
            if n > self.scores[k].size:
                raise InvalidInputError(
                    f"the ranking keeps {self.depth} events per stream, but {xsec_pb:g} pb "
                    f"needs {n} of stream {STREAMS[k]}; rank with depth >= {n_requested}"
                )
        return PointRegions(
            xsec_pb=float(xsec_pb),
            n_pass=tuple(n_pass),
            whole_stream=tuple(n_requested >= n for n in self.n_search),
            lowest_score=tuple(
                float(self.scores[k][n - 1]) if n else None for k, n in enumerate(n_pass)
            ),
        )

    def cuts(self, xsec_pb: float, lumi_pb: float) -> tuple[float, ...]:
        """Per stream, the score cut of `core.anomaly.anomaly_region` at `xsec_pb` (pb).

        The highest score of a stream event outside the region, -inf when the region is the
        whole stream; the ranking must hold one event past the region.
        """
        regions = self.regions(xsec_pb, lumi_pb)
        cuts = []
        for k, n in enumerate(regions.n_pass):
            if n == self.n_search[k]:
                cuts.append(-math.inf)
            elif n < self.scores[k].size:
                cuts.append(float(self.scores[k][n]))
            else:
                raise InvalidInputError(
                    f"the ranking keeps {self.depth} events per stream; the cut of stream "
                    f"{STREAMS[k]} at {xsec_pb:g} pb needs {n + 1}: rank with depth >= {n + 1}"
                )
        return tuple(cuts)


def rank_streams(
    path: str | Path,
    depth: int,
    exclude: ExcludeFunction,
    *,
    batch_size: int = BATCH_ROWS,
) -> StreamRanking:
    """One pass over the scored event table at `path`: every stream's `depth` best events.

    `exclude(keys)` marks the rows no region may hold (the autoencoder's training events).
    Reads the keys, scores and stream bits alone. Raises InvalidInputError for an unscored
    table or for an event key seen twice among the kept events (an input read twice).
    """
    if depth < 0:
        raise InvalidInputError(f"rank_streams: depth must be >= 0 events, got {depth}")
    kept = [_Best(depth) for _ in STREAMS]
    n_search = [0] * len(STREAMS)
    n_rows = n_excluded = 0
    for batch in _search_batches(path, exclude, batch_size):
        n_rows += batch.keys.size
        n_excluded += batch.n_excluded
        for k, (best, rows) in enumerate(zip(kept, batch.search_rows, strict=True)):
            n_search[k] += rows.size
            best.add(batch.score[rows], batch.keys[rows])
    ranked = [best.ranked() for best in kept]
    for (_, keys), stream in zip(ranked, STREAMS, strict=True):
        refuse_duplicate_events(keys, f"event table {path}, stream {stream}")
    return StreamRanking(
        scores=tuple(scores for scores, _ in ranked),
        keys=tuple(keys for _, keys in ranked),
        n_search=tuple(n_search),
        n_rows=n_rows,
        n_excluded=n_excluded,
        depth=depth,
    )


class _Best:
    """The `depth` highest (score, key) pairs seen so far, by score then lower key.

    Added pairs are buffered; when the buffer passes 1.25 depth it is cut back to the depth
    best, so memory stays near depth whatever the ties.
    """

    def __init__(self, depth: int) -> None:
        self.depth = depth
        self.scores: list[FloatArray] = []
        self.keys: list[IntArray] = []
        self.size = 0

    def add(self, scores: FloatArray, keys: IntArray) -> None:
        self.scores.append(scores)
        self.keys.append(keys)
        self.size += scores.size
        if self.size > self.depth + max(self.depth // 4, 1):
            self._cut()

    def _cut(self) -> None:
        """Keep exactly the `depth` best: above the depth-th score, then ties by lower key."""
        scores = np.concatenate([np.empty(0), *self.scores])
        keys = np.concatenate([np.empty(0, dtype=np.int64), *self.keys])
        if scores.size > self.depth:
            keep = np.zeros(scores.size, dtype=np.bool_)
            if self.depth:
                kth = scores.size - self.depth
                threshold = np.partition(scores, kth)[kth]
                keep = scores > threshold
                tied = np.flatnonzero(scores == threshold)
                needed = self.depth - int(np.count_nonzero(keep))
                keep[tied[np.argsort(keys[tied], kind="stable")[:needed]]] = True
            scores, keys = scores[keep], keys[keep]
        self.scores, self.keys, self.size = [scores], [keys], scores.size

    def ranked(self) -> tuple[FloatArray, IntArray]:
        self._cut()
        scores, keys = self.scores[0], self.keys[0]
        order = np.lexsort((keys, -scores))[: self.depth]
        return scores[order], keys[order]


def ranked_values(
    path: str | Path, ranking: StreamRanking, column: str, *, batch_size: int = BATCH_ROWS
) -> tuple[FloatArray, ...]:
    """Per stream, `column` (e.g. "m_jj") of each event `ranking` holds, in its order.

    One pass over the key and `column` of the ranked table, whatever its size: memory
    follows the ranking's depth. Raises InvalidInputError when a ranked event is not found
    (the table changed since it was ranked).
    """
    orders = [np.argsort(keys, kind="stable") for keys in ranking.keys]
    sorted_keys = [keys[order] for keys, order in zip(ranking.keys, orders, strict=True)]
    values = [np.full(keys.size, np.nan) for keys in ranking.keys]
    found = [np.zeros(keys.size, dtype=np.bool_) for keys in ranking.keys]
    for batch in iter_table_columns(path, ["key", column], batch_size):
        keys = batch["key"].astype(np.int64)
        for k, ranked in enumerate(sorted_keys):
            if not ranked.size:
                continue
            at = np.minimum(np.searchsorted(ranked, keys), ranked.size - 1)
            hit = ranked[at] == keys
            rows = orders[k][at[hit]]
            values[k][rows] = batch[column][hit]
            found[k][rows] = True
    for k, seen in enumerate(found):
        if not seen.all():
            raise InvalidInputError(
                f"event table {path} lacks {int(np.count_nonzero(~seen))} events of stream "
                f"{STREAMS[k]} it was ranked with; it changed since: rerun"
            )
    return tuple(values)


def search_spectrum(
    path: str | Path,
    stream: str,
    pair: str,
    exclude: ExcludeFunction,
    *,
    batch_size: int = BATCH_ROWS,
) -> IntArray:
    """The `pair` spectrum (on `mass_bin_edges()`) of every search event of `stream`.

    One pass over the table's keys, scores, stream bits and that pair's mass; the events
    `exclude(keys)` marks (the training events) are left out, as from every region.
    """
    k, column = STREAMS.index(stream), MASS_COLUMNS[PAIRS.index(pair)]
    counts = np.zeros(mass_bin_edges().size - 1, dtype=np.int64)
    for batch in _search_batches(path, exclude, batch_size, (column,)):
        values = batch.columns[column].astype(np.float64)
        counts += mass_counts(values[batch.search_rows[k]])
    return counts


def points_spectra(
    path: str | Path,
    ranking: StreamRanking,
    regions: Sequence[PointRegions],
    exclude: ExcludeFunction,
    *,
    batch_size: int = BATCH_ROWS,
) -> list[IntArray]:
    """The 63 spectra (SPECTRUM_NAMES order, on `mass_bin_edges()`) of every point's regions.

    One more pass over the table of `ranking`; returns one (63, n_bins) count array per
    entry of `regions`, in their order.
    """
    order = _tightest_first(regions)
    n_bins = mass_bin_edges().size - 1
    n_points = len(order)
    filled = np.zeros((len(STREAMS), len(PAIRS), n_points, n_bins), dtype=np.int64)
    points = [regions[i] for i in order]
    for _, masses, held in _held_events(path, ranking, points, exclude, batch_size):
        bins, counted = mass_bins(masses, mass_bin_edges())
        for k, (rows, tightest) in enumerate(held):
            for j in range(len(PAIRS)):
                use = counted[rows, j]
                index = tightest[use] * n_bins + bins[rows[use], j]
                filled[k, j] += np.bincount(index, minlength=n_points * n_bins).reshape(
                    n_points, n_bins
                )
    cumulative = np.cumsum(filled, axis=2)
    spectra: list[IntArray] = [np.empty(0, dtype=np.int64)] * n_points
    for position, i in enumerate(order):
        spectra[i] = cumulative[:, :, position, :].reshape(len(SPECTRUM_NAMES), n_bins)
    return spectra


@dataclass(frozen=True)
class ReplicaRequest:
    """Bootstrap replicas of one spectrum ("T2/jm") at one point, over bins [first, stop)."""

    spectrum: str
    point: PointRegions
    first_bin: int
    stop_bin: int


def points_bootstrap(
    path: str | Path,
    ranking: StreamRanking,
    requests: Sequence[ReplicaRequest],
    exclude: ExcludeFunction,
    n_replicas: int,
    key: int,
    *,
    batch_size: int = BATCH_ROWS,
) -> list[npt.NDArray[np.int32]]:
    """Replica counts (n_replicas, stop - first) of every request, in one pass over the table.

    Event e (the table's row) weighs `core.bootstrap.replica_weights(key, [e], ...)` in
    every replica, as in `core.bootstrap.bootstrap_spectra` on the whole table.
    """
    if n_replicas < 3:
        raise InvalidInputError(f"points_bootstrap needs n_replicas >= 3, found {n_replicas}")
    points = sorted({r.point for r in requests}, key=lambda p: p.xsec_pb)
    edges = mass_bin_edges()
    targets = [_request_target(r, points, edges.size - 1) for r in requests]
    totals = [np.zeros((r.stop_bin - r.first_bin, n_replicas), np.int32) for r in requests]
    for offset, masses, held in _held_events(path, ranking, points, exclude, batch_size):
        bins, counted = mass_bins(masses, edges)
        for (stream, pair, point, request), total in zip(targets, totals, strict=True):
            rows, tightest = held[stream]
            chosen = rows[(tightest <= point) & counted[rows, pair]]
            chosen_bins = bins[chosen, pair]
            inside = (chosen_bins >= request.first_bin) & (chosen_bins < request.stop_bin)
            add_replica_counts(
                total, chosen[inside] + offset, chosen_bins[inside] - request.first_bin, key
            )
    return [np.ascontiguousarray(total.T) for total in totals]


def _request_target(
    request: ReplicaRequest, points: list[PointRegions], n_bins: int
) -> tuple[int, int, int, ReplicaRequest]:
    """(stream, pair, point index, request) of a checked request."""
    if request.spectrum not in SPECTRUM_NAMES:
        raise InvalidInputError(
            f"points_bootstrap: unknown spectrum {request.spectrum!r}; expected STREAM/PAIR "
            f"with a stream of {STREAMS} and a pair of {PAIRS}"
        )
    if not 0 <= request.first_bin < request.stop_bin <= n_bins:
        raise InvalidInputError(
            f"points_bootstrap: bins [{request.first_bin}, {request.stop_bin}) of "
            f"{request.spectrum!r} are not a range of the {n_bins} mass bins"
        )
    stream, _, pair = request.spectrum.partition("/")
    return STREAMS.index(stream), PAIRS.index(pair), points.index(request.point), request


def _tightest_first(regions: Sequence[PointRegions]) -> list[int]:
    """Indices of `regions` by cross-section, tightest first."""
    if not regions:
        raise InvalidInputError("points_spectra: no AR point given")
    return sorted(range(len(regions)), key=lambda i: regions[i].xsec_pb)


@dataclass(frozen=True)
class _SearchBatch:
    """A batch of the table's rows: its columns, scores, keys and per-stream search rows.

    `search_rows[k]` are the rows of stream k that are not excluded, of which there are
    `n_excluded` in the batch.
    """

    columns: dict[str, npt.NDArray[np.generic]]
    score: FloatArray
    keys: IntArray
    n_excluded: int
    search_rows: list[IntArray]


def _search_batches(
    path: str | Path,
    exclude: ExcludeFunction,
    batch_size: int,
    extra_columns: Sequence[str] = (),
) -> Iterator[_SearchBatch]:
    """The table in batches of keys, scores, stream bits and `extra_columns`, read alone."""
    columns = ["key", SCORE_COLUMN, *STREAMS, *extra_columns]
    for batch in iter_table_columns(path, columns, batch_size):
        keys = batch["key"].astype(np.int64)
        excluded = np.asarray(exclude(keys), dtype=np.bool_)
        yield _SearchBatch(
            columns=batch,
            score=batch[SCORE_COLUMN].astype(np.float64),
            keys=keys,
            n_excluded=int(np.count_nonzero(excluded)),
            search_rows=[np.flatnonzero(batch[stream] & ~excluded) for stream in STREAMS],
        )


def _held_events(
    path: str | Path,
    ranking: StreamRanking,
    points: Sequence[PointRegions],
    exclude: ExcludeFunction,
    batch_size: int,
) -> Iterator[tuple[int, FloatArray, list[tuple[IntArray, IntArray]]]]:
    """Per batch: its first row, masses (n, 9) GeV, and per stream (rows, tightest point).

    The rows are the batch's events that some point's region holds, the tightest point the
    first (of `points`, ordered tightest first) that holds each.
    """
    cuts = [_cuts(ranking, k, points) for k in range(len(STREAMS))]
    offset = 0
    for batch in _search_batches(path, exclude, batch_size, MASS_COLUMNS):
        held = []
        for (cut_scores, cut_keys), rows in zip(cuts, batch.search_rows, strict=True):
            tightest = np.empty(rows.size, dtype=np.int64)
            _tightest_point(batch.score[rows], batch.keys[rows], cut_scores, cut_keys, tightest)
            inside = tightest < len(points)
            held.append((rows[inside], tightest[inside]))
        masses = np.column_stack([batch.columns[c].astype(np.float64) for c in MASS_COLUMNS])
        yield offset, masses.reshape(batch.keys.size, len(MASS_COLUMNS)), held
        offset += batch.keys.size
    if offset != ranking.n_rows:
        raise InvalidInputError(
            f"event table {path} has {offset} rows, not the {ranking.n_rows} it was ranked "
            "with; it changed during the scan: rerun"
        )


def _cuts(
    ranking: StreamRanking, stream: int, points: Sequence[PointRegions]
) -> tuple[FloatArray, IntArray]:
    """Per point, the (score, key) of the last event stream `stream`'s region holds.

    An event is held when its score is higher, or equal with a key no larger. An empty
    region has score +inf (no event is held).
    """
    scores, keys = ranking.scores[stream], ranking.keys[stream]
    cut_scores = np.full(len(points), np.inf)
    cut_keys = np.zeros(len(points), dtype=np.int64)
    for i, point in enumerate(points):
        n = point.n_pass[stream]
        if n:
            cut_scores[i], cut_keys[i] = scores[n - 1], keys[n - 1]
    return cut_scores, cut_keys


@numba.njit(cache=True, nogil=True)
def _tightest_point(
    scores: FloatArray,
    keys: IntArray,
    cut_scores: FloatArray,
    cut_keys: IntArray,
    out: IntArray,
) -> None:
    """out[i] = the first point (cuts ordered tightest first) holding event i, else n_points."""
    n_points = cut_scores.size
    for i in range(scores.size):
        score, key = scores[i], keys[i]
        low, high = 0, n_points
        while low < high:
            middle = (low + high) // 2
            if score > cut_scores[middle] or (
                score == cut_scores[middle] and key <= cut_keys[middle]
            ):
                high = middle
            else:
                low = middle + 1
        out[i] = low
