"""Reinterpretation: the acceptance of any signal sample, injection and recovery, the AE gain.

Acceptance (the ADFilter use case). A run's anomaly region (AR) at cross-section sigma in
stream T is a cut on the anomaly score: its events have score > c_T(sigma), c the cut the
run's own data set (`core.anomaly.anomaly_region`; -inf when the AR is the whole stream).
A signal event passes when it is in stream T and its score (the run's autoencoder on its
RMM) is above that cut; events exactly at the cut do not pass (the tie-break of the data is
among data events). Its acceptance A(T/pair, sigma) is the weighted fraction of ALL events
of the sample (before any selection) that pass and have the pair: the events the spectrum
T/pair gets. With the luminosity of the search L_search = (1 - f) L_int, a model of cross
section sigma_model puts sigma_model x A x L_search events into the spectrum, so a 95 % CL
limit on sigma x A x eff (pb, per spectrum and AR point) gives the excluded model
cross-section sigma_model = limit / A. (The limit must then count its signal yield over
L_search as well; `acceptance_fit_range` counts only masses inside the spectrum's fit range.)

Injection. A resonance of observed width sigma_m = sqrt(r(m)^2 + (w m)^2)
(`signal_sigma_gev`: r the detector resolution `core.masses.mass_resolution`, w the width
fraction) is drawn with the generator's Gaussian lineshape (the synthetic objects carry no
detector smearing, so the drawn mass is the observed one): its true shape is the fit's
template. Its yield is recovered by a binned extended Poisson fit of background + Gaussian
(`fit_injected_signal`): the background is the accepted function with its normalisation
and shape parameters floating (whitened as in core.robustness; one engine,
core.significance.fit_signal_and_background), the signal a Gaussian of fixed mass and
width with free (possibly negative) yield over the fit range;
local Z = sqrt(q0), q0 = 2 (NLL(s = 0) - NLL(s_hat)) for s_hat > 0. The injected truth
counts the injected events that entered the spectrum with the pair built from the two decay
products (reconstructed mass within `PAIRED_TOLERANCE` of the true mass, `correctly_paired`);
injected events whose leading pair is another object are background-like and not counted.
The fit error holds the Poisson spread of the signal itself, so a pull is taken against the
expected yield (sigma x A x L_search, A of the paired events), the injected count varying
from toy to toy around it; against the realised count its width would be below 1.

Background toys. An injection test on the run's own data measures the data, not the method:
a fluctuation of the data under the peak is the same in every toy and biases every pull
alike. A background toy (`background_toy`) replaces the data of a spectrum in its fit range
by Poisson counts of the run's own accepted background prediction B (made before anything
was injected) scaled by k = (data events the injected table's AR cut keeps in the fit range)
/ (data events the run's cut kept there): with the AR's size fixed (N = sigma_AR L_search),
injected events above the cut displace data events, and k < 1 keeps that. The toy's truth
is then known: B k plus the injected events.

Sensitivity gain (PHYSICS.md 6). Expected Z = sqrt(2((s + b) ln(1 + s/b) - s)) with s the
expected signal and b the accepted background in the +-2 sigma_m window around the mass, with
the AR cut (Z_AE) and on the whole stream (Z); dZ = (Z_AE / Z - 1) x 100 %.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from scipy import stats

from core.autoencoder import load_scorer, training_selection
from core.errors import FitError, InvalidInputError
from core.events.reading import iterate_events
from core.events.selection import ObjectSelection
from core.fit import BinnedShape, FitResult, prepare_spectrum, shape_directions
from core.masses import PAIRS, STREAMS, mass_resolution
from core.significance import (
    FloatingShape,
    ae_gain_percent,
    expected_significance,
    fit_signal_and_background,
    gaussian_bin_fractions,
)
from core.table import EventTable, read_event_table, write_event_table

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

PAIRED_TOLERANCE: Final = 1e-3
"""Relative difference of reconstructed and true mass below which the pair is the decay's."""

WINDOW_SIGMAS: Final = 2.0
"""Half-width of the expected-significance window, in signal widths."""


def signal_sigma_gev(mass_gev: float, width_fraction: float) -> float:
    """Observed Gaussian width (GeV): sqrt(r(m)^2 + (f m)^2), r the detector resolution.

    f is the intrinsic width as a fraction of the mass; f = 0 is the resolution alone (the
    ATLAS "width 0"). The same definition as the limits (core/limits.py), so that a limit
    and an acceptance or injection at the same (mass, width) describe the same signal.
    """
    if not (math.isfinite(mass_gev) and mass_gev > 0):
        raise InvalidInputError(f"the signal mass must be a positive number of GeV, got {mass_gev}")
    if not (math.isfinite(width_fraction) and 0 <= width_fraction < 1):
        raise InvalidInputError(
            f"the width is a fraction of the mass in [0, 1) (0 = detector resolution), got "
            f"{width_fraction}; e.g. --width 0.05 for 5 %"
        )
    resolution = float(mass_resolution(float(mass_gev)))
    return math.hypot(resolution, width_fraction * mass_gev)


@dataclass(frozen=True)
class RegionCut:
    """The AR of one stream at one point: events with score > `cut` pass (-inf: whole stream)."""

    point_pb: float
    stream: str
    cut: float
    whole_stream: bool


@dataclass(frozen=True)
class PairAcceptance:
    """Acceptance of one spectrum (stream/pair) at one AR point, with its mass histogram."""

    pair: str
    n_pass: int
    acceptance: float
    acceptance_interval: tuple[float, float]
    acceptance_fit_range: float
    counts: FloatArray


@dataclass(frozen=True)
class StreamAcceptance:
    """Acceptance of one stream at one AR point (any pair) and of its 9 spectra."""

    stream: str
    point_pb: float
    cut: float
    whole_stream: bool
    n_stream: int
    n_pass: int
    acceptance: float
    acceptance_interval: tuple[float, float]
    stream_acceptance: float
    pairs: tuple[PairAcceptance, ...]


@dataclass(frozen=True)
class AcceptanceResult:
    """Per stream and AR point, the acceptance of a sample of `n_events` (weights summed)."""

    n_events: int
    sum_weights: float
    edges: FloatArray
    streams: tuple[StreamAcceptance, ...]


def clopper_pearson(k: int, n: int, level: float = 0.6827) -> tuple[float, float]:
    """Central Clopper-Pearson interval of a binomial fraction k / n (68.27 % by default)."""
    if n <= 0 or not 0 <= k <= n:
        raise InvalidInputError(f"a binomial interval needs 0 <= k <= n, n > 0; got k={k}, n={n}")
    alpha = 1.0 - level
    low = 0.0 if k == 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def region_mask(
    score: FloatArray, stream_bits: BoolArray, region: RegionCut
) -> npt.NDArray[np.bool_]:
    """Events of the sample in the stream of `region` with score above its cut."""
    in_stream = stream_bits[:, STREAMS.index(region.stream)]
    if region.whole_stream:
        return np.asarray(in_stream, dtype=np.bool_)
    return np.asarray(in_stream & (score > region.cut), dtype=np.bool_)


def signal_acceptance(
    masses: npt.ArrayLike,
    stream_bits: npt.ArrayLike,
    score: npt.ArrayLike,
    weight: npt.ArrayLike,
    regions: Sequence[RegionCut],
    edges: npt.ArrayLike,
    fit_ranges: dict[str, tuple[float, float]],
) -> AcceptanceResult:
    """Acceptance of a signal sample's events (module docstring) in every region.

    `masses` (n, 9) GeV and `stream_bits` (n, 7) as in the event table, `score` the run's
    autoencoder score, `weight` the event weights; `fit_ranges` per stream [lo, hi] GeV.
    The histograms are on `edges` (the run's binning), weighted.
    """
    m = np.asarray(masses, dtype=np.float64)
    bits = np.asarray(stream_bits, dtype=np.bool_)
    s = np.asarray(score, dtype=np.float64)
    w = np.asarray(weight, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    n = len(s)
    if m.shape != (n, len(PAIRS)) or bits.shape != (n, len(STREAMS)) or w.shape != (n,):
        raise InvalidInputError(
            f"signal events: expected masses (n, 9), stream bits (n, 7) and n weights for "
            f"n = {n} scores; found {m.shape}, {bits.shape}, {w.shape}"
        )
    if n == 0:
        raise InvalidInputError(
            "the signal sample holds no events; give files with events of the model"
        )
    if not np.all(np.isfinite(s)) or not np.all(np.isfinite(w)):
        raise InvalidInputError("signal scores and weights must be finite; rescore the sample")
    total = float(w.sum())
    if not total > 0:
        raise InvalidInputError(
            f"the signal weights sum to {total}; acceptance is a fraction of a positive total"
        )
    rows = []
    for region in regions:
        passed = region_mask(s, bits, region)
        in_stream = bits[:, STREAMS.index(region.stream)]
        low, high = fit_ranges[region.stream]
        pairs = []
        for k, pair in enumerate(PAIRS):
            values = m[:, k]
            has_pair = passed & np.isfinite(values) & (values >= e[0]) & (values <= e[-1])
            in_fit = has_pair & (values >= low) & (values < high)
            counts, _ = np.histogram(values[has_pair], bins=e, weights=w[has_pair])
            n_pass = int(np.count_nonzero(has_pair))
            pairs.append(
                PairAcceptance(
                    pair=pair,
                    n_pass=n_pass,
                    acceptance=float(w[has_pair].sum()) / total,
                    acceptance_interval=clopper_pearson(n_pass, n),
                    acceptance_fit_range=float(w[in_fit].sum()) / total,
                    counts=np.asarray(counts, dtype=np.float64),
                )
            )
        n_pass = int(np.count_nonzero(passed))
        rows.append(
            StreamAcceptance(
                stream=region.stream,
                point_pb=region.point_pb,
                cut=region.cut,
                whole_stream=region.whole_stream,
                n_stream=int(np.count_nonzero(in_stream)),
                n_pass=n_pass,
                acceptance=float(w[passed].sum()) / total,
                acceptance_interval=clopper_pearson(n_pass, n),
                stream_acceptance=float(w[in_stream].sum()) / total,
                pairs=tuple(pairs),
            )
        )
    return AcceptanceResult(n, total, e, tuple(rows))


def correctly_paired(reconstructed: npt.ArrayLike, true_mass: npt.ArrayLike) -> BoolArray:
    """Events whose pair mass is that of the decay products (module docstring)."""
    reco = np.asarray(reconstructed, dtype=np.float64)
    truth = np.asarray(true_mass, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        close = np.abs(reco / truth - 1.0) < PAIRED_TOLERANCE
    return np.asarray(np.isfinite(reco) & close, dtype=np.bool_)


@dataclass(frozen=True)
class RecoveredSignal:
    """A Gaussian signal yield fitted with a floating background (module docstring).

    `signal_yield` is the whole Gaussian's events (its part outside the fit range is
    extrapolated, `fraction_in_range` of it is inside); `q0` and `local_z` the discovery test.
    """

    mass: float
    sigma: float
    signal_yield: float
    signal_yield_error: float
    q0: float
    local_z: float
    fraction_in_range: float
    background_directions: int
    valid: bool


def fit_injected_signal(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    background: FitResult,
    mass: float,
    sigma: float,
) -> RecoveredSignal:
    """Fit background (the function of `background`, floating) + Gaussian at `mass` (GeV).

    The fit range and the starting point are those of `background` (an accepted fit of these
    counts). As many shape directions float as the background fit had free parameters; for a
    shape without an analytic gradient whose fit is not accurate, up to two of its sloppiest
    are held (as core.robustness). Raises FitError when no fit converges.
    """
    problem = prepare_spectrum(
        edges, counts, background.fit_range, sqrt_s=background.sqrt_s, exclude=None
    )
    shape = BinnedShape(problem, background.function)
    used = problem.used
    template_all = gaussian_bin_fractions(problem.range_edges, mass, sigma)
    template = template_all[used]
    fraction = float(template.sum())
    if fraction < 1e-6:
        raise InvalidInputError(
            f"a Gaussian at {mass:g} GeV (sigma {sigma:.3g} GeV) lies outside the fit range "
            f"{problem.fit_range[0]:.0f}-{problem.fit_range[1]:.0f} GeV; choose a mass inside it"
        )
    n = problem.range_counts[used]
    b = np.asarray(background.expected, dtype=np.float64)[used]
    n_directions = background.n_free - 1
    smallest = n_directions if shape.features is not None else max(n_directions - 2, 1)
    for kept in range(n_directions, smallest - 1, -1):
        try:
            directions = shape_directions(shape, background.theta, max_directions=kept)
        except FitError:
            break
        floating = FloatingShape(shape, background.theta, directions)
        weights = template / np.maximum(b, 1e-12)
        start = float(np.sum(weights * (n - b)) / max(float(np.sum(weights * template)), 1e-12))
        free = fit_signal_and_background(
            n, b, template, floating_shape=floating, signal_starts=(start, 0.0)
        )
        null = fit_signal_and_background(n, b, template, floating_shape=floating, fix_signal=True)
        if free.valid and null.valid:
            q0 = max(2.0 * (null.nll - free.nll), 0.0) if free.signal > 0 else 0.0
            return RecoveredSignal(
                mass=float(mass),
                sigma=float(sigma),
                signal_yield=free.signal,
                signal_yield_error=free.signal_error,
                q0=q0,
                local_z=math.sqrt(q0),
                fraction_in_range=fraction,
                background_directions=int(directions.shape[1]),
                valid=True,
            )
    raise FitError(
        f"the background + Gaussian fit at {mass:g} GeV (sigma {sigma:.3g} GeV) with "
        f"{background.name} floating found no valid minimum"
    )


def window_bins(edges: npt.ArrayLike, mass: float, sigma: float) -> tuple[int, int]:
    """Bins [first, stop) overlapping mass +- WINDOW_SIGMAS sigma (GeV)."""
    e = np.asarray(edges, dtype=np.float64)
    low, high = mass - WINDOW_SIGMAS * sigma, mass + WINDOW_SIGMAS * sigma
    first = int(np.searchsorted(e, low, side="right") - 1)
    stop = int(np.searchsorted(e, high, side="left"))
    first = max(first, 0)
    stop = min(max(stop, first + 1), len(e) - 1)
    return first, stop


def window_expected_z(signal: float, background: float) -> float | None:
    """Asimov expected Z of s over b in a window; None when b <= 0 (not defined)."""
    if not background > 0:
        return None
    return float(expected_significance(max(signal, 0.0), background))


def ae_gain(z_ae: float | None, z_whole: float | None) -> float | None:
    """DZ = (Z_AE / Z - 1) x 100 % (`ae_gain_percent`), None when either is missing or Z = 0."""
    if z_ae is None or z_whole is None or not z_whole > 0:
        return None
    return ae_gain_percent(z_ae, z_whole)


def background_toy(
    expected: npt.ArrayLike,
    kept: float,
    kept_run: float,
    rng: np.random.Generator,
) -> tuple[FloatArray, float]:
    """Background-only counts: Poisson(expected x k) per bin, k = kept / kept_run (module).

    `expected` is the run's accepted background per bin (events), `kept` and `kept_run` the
    data events in its fit range under the injected table's and the run's AR cut. Returns
    the counts and k.
    """
    b = np.asarray(expected, dtype=np.float64)
    if not (kept_run > 0 and kept >= 0) or not np.all(np.isfinite(b)) or np.any(b < 0):
        raise InvalidInputError(
            f"a background toy needs a finite non-negative prediction and kept / kept_run with "
            f"kept_run > 0; got kept {kept}, kept_run {kept_run}"
        )
    scale = float(kept) / float(kept_run)
    return rng.poisson(b * scale).astype(np.float64), scale


def score_sample(
    files: Sequence[str | Path],
    model: Path,
    output: Path,
    *,
    schema: str = "auto",
    selection: ObjectSelection | None = None,
    tree: str | None = None,
    mapping: str | None = None,
    step_size: int = 100_000,
) -> EventTable:
    """Read, select, RMM and score a sample's files with `model` into an event table.

    The chain of the event pass (core.events reader and selection, core.table rows with
    core.rmm features scored by core.autoencoder), written to `output` (Parquet, atomic)
    and read back. The `training` column follows the model card as for any table; a
    sample's events were never trained on, so acceptance ignores it.
    """
    scorer = load_scorer(model)
    card = scorer.card
    write_event_table(
        iterate_events(
            [str(f) for f in files],
            schema,
            step_size=step_size,
            selection=selection or ObjectSelection(),
            tree=tree,
            mapping=mapping,
        ),
        output,
        score=scorer.score_chunk,
        training=lambda keys: training_selection(keys, card.fraction, card.seed),
    )
    return read_event_table(output)
