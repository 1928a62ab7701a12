"""95 % CL upper limits on a Gaussian signal over an accepted fitted background (CLs).

The model of one limit (one spectrum, AR point, signal mass m and width): the bins of the
signal window W, the bins of the fit range overlapping m +- `WINDOW_SIGMAS` sigma_s, are
Poisson with mean

    lambda_i(S, theta) = S g_i + b_i + theta delta_i,    theta ~ N(0, 1) (constraint),

with S the signal yield (events, the parameter of interest, S >= 0), g_i the fraction of the
Gaussian signal (mean m, sigma sigma_s GeV) inside bin i, integrated over the bin
(`core.significance.gaussian_bin_fractions`, so sum g_i < 1 when part of the signal lies
outside W: the limit is on the whole signal), b_i the accepted fitted background and
delta_i = sigma_i its 1-sigma fit uncertainty: the fit covariance propagated to the bin
integrals (`core.fit.expected_errors`, stored as `background_error` in the run folder).
sigma x A x eff (pb) = S / L with L the luminosity (pb^-1) of the events in the spectra.

The background uncertainty is **one constrained shape nuisance** (a HistFactory `histosys`
with symmetric variations b +- delta, linear in theta), fully correlated across W, not a
normalisation nuisance: (1) the relative fit uncertainty grows with mass across a wide
window (a normalisation factor would give every bin the same one), and (2) bins of a smooth
fit are positively correlated; full correlation gives the signal-weighted background sum
sum g_i b_i the uncertainty sum g_i sigma_i, the upper bound of its true
sqrt(g^T C g) (Cauchy-Schwarz), so the correlation assumption never makes a limit
optimistic. Only the window enters: the sidebands already determined the fit, and the
constraint term is their information; fitting them again would count it twice.
theta is bounded below where a bin's mean reaches zero (lambda_i >= 0; a bin with events
keeps lambda_i > 0).

Signal widths: sigma_s = sqrt(w(m)^2 + (f m)^2), w the detector mass resolution
(`core.masses.mass_resolution`, the bin width of the spectra) and f the intrinsic width as
a fraction of the mass; f = 0 is the detector resolution alone (the ATLAS "width 0"). A
reconstructed resonance is never narrower than the resolution, hence the sum in quadrature.

Test statistic and CLs (Cowan, Cranmer, Gross, Vitells, arXiv:1007.1727; as in pyhf's
`AsymptoticCalculator(test_stat="qtilde")`): q~_S = -2 ln [L(S, theta^^(S)) / L(S^, theta^)]
with S^ >= 0 (the S^ < 0 case of eq. 16 is L(0, theta^^(0)) in the denominator), and
q~_S = 0 for S^ > S. q_{S,A} is the same statistic on the Asimov data set of S = 0 with
theta at theta^^(0) of the observed data (main counts b + theta^^(0) delta, auxiliary
measurement theta^^(0)). With t = sqrt(q~) - sqrt(q_A) when sqrt(q~) <= sqrt(q_A), else
(q~ - q_A) / (2 sqrt(q_A)): CL_s+b = Phi(-(t + sqrt(q_A))), CL_b = Phi(-t),
CL_s = CL_s+b / CL_b. The expected CL_s at n sigma is Phi(-(n + sqrt(q_A))) / Phi(-n), so
the expected limit of band n solves sqrt(q_A(S)) = -Phi^-1(alpha Phi(-n)) - n (alpha = 0.05:
1.96 for the median). `EXPECTED_SIGMAS` lists the bands in the order of their limits:
-2, -1, 0, +1, +2 sigma (pyhf's order).

Low counts: the asymptotic formulae need enough background in the window. Far in a
spectrum's tail (window background b_w of a few events or less) they are optimistic: one
bin without uncertainty gives a median expected limit of 1.92 events at b -> 0 against 3.00
from the exact Poisson CL_s (-34 %), -17 % at b = 1, -9 % at b = 5, -7 % at b = 10, -4 % at
b = 30 (the exact median taken at the median count), and their bands are Gaussian where the
count is a handful of integers. So by default (`method="auto"`) every window whose fitted
background is below `LOW_COUNT_BACKGROUND` events is solved exactly as a counting
experiment instead: n = the events in W, b = sum b_i, delta = sum delta_i (the fully
correlated shape nuisance summed), G = sum g_i, test statistic the count itself (for one
bin without uncertainty q~ orders the outcomes the same way), and

    CL_s(S) = E[P(N <= n | S G + b')] / E[P(N <= n | b')],    b' ~ N(b, delta), b' >= 0,

the expectations over the truncated Gaussian (the background uncertainty marginalised, as
Cousins and Highland; `PRIOR_NODES` equal-probability nodes). The expected limit of band k
is the limit of the smallest count whose probability under b' (the same prior) reaches
Phi(k): the quantiles of a discrete count, so bands can coincide (at b -> 0 every band is
3.00 events). This CL_s covers by construction (over-covers: the count is discrete and CL_s
conservative). It ignores the shape of the signal inside the window, so in a multi-bin
window it is weaker than the profile likelihood: on a flat 5-bin window the median at b = 5
is 6.55 events against 5.37 asymptotic, 11.5 against 9.5 at b = 20, so a limit curve steps
up by about 20 % where b_w falls below the threshold. `LimitCurve.counting` marks these
limits; `method="asymptotic"` or `"poisson"` forces one calculation everywhere.

Paths: `cls_upper_limits` (default "auto") profiles theta and S with vectorised Newton steps
over any number of limits at once, and solves every limit (asymptotic or exact count) with a
bracketed Illinois root finder in ln S to `ROOT_RTOL`; `method="pyhf"` builds the
asymptotic model in pyhf (one `histosys`, POI bounded at 0) and calls
`pyhf.infer.intervals.upper_limits.toms748_scan` per limit: the reference of the asymptotic
path (tests/core/test_limits.py compares both), about a second per limit.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from scipy.special import gammaincc, log_ndtr, ndtr, ndtri, xlogy

from core.errors import FitError, InvalidInputError
from core.masses import mass_resolution
from core.significance import gaussian_bin_fractions

FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

LimitMethod = Literal["auto", "asymptotic", "poisson", "pyhf"]

DEFAULT_WIDTHS: Final = (0.0, 0.05, 0.10, 0.15)
"""Intrinsic signal widths as fractions of the mass (0 = detector resolution)."""

DEFAULT_CL: Final = 0.95
EXPECTED_SIGMAS: Final = (-2, -1, 0, 1, 2)
"""The expected-limit bands, in the order of `Limits.expected` columns."""

WINDOW_SIGMAS: Final = 2.0
"""The likelihood covers the bins overlapping m +- this many sigma_s."""

DEFAULT_N_MASSES: Final = 30
ROOT_RTOL: Final = 1e-5
"""Relative tolerance of every limit on S."""

LOW_COUNT_BACKGROUND: Final = 5.0
"""Below this window background (events) the default limit is the exact CL_s of the count."""

MIN_BACKGROUND: Final = 1e-9
"""Background below this (events per bin, an underflowed tail) is raised to it."""

PRIOR_NODES: Final = 64
"""Nodes of the background prior in the exact CL_s of a window count."""

_MAX_COUNT: Final = 10_000
_MAX_NEWTON: Final = 200
_MAX_ROOT: Final = 200
_MAX_EXPAND: Final = 80


def signal_sigma(mass_gev: npt.ArrayLike, width_fraction: float) -> FloatArray:
    """Gaussian sigma (GeV) of a signal of intrinsic width `width_fraction` x m at m (GeV)."""
    if not (math.isfinite(width_fraction) and 0.0 <= width_fraction < 1.0):
        raise InvalidInputError(
            f"a signal width must be a fraction of the mass in [0, 1), got {width_fraction}"
        )
    masses = np.asarray(mass_gev, dtype=np.float64)
    return np.asarray(np.hypot(mass_resolution(masses), width_fraction * masses), dtype=np.float64)


def expected_targets(cl: float = DEFAULT_CL) -> FloatArray:
    """sqrt(q_A) at each expected-limit band of `EXPECTED_SIGMAS` (1.96 for the median)."""
    alpha = 1.0 - cl
    n = _BAND_SHIFTS
    return np.asarray(-ndtri(alpha * _phi(-n)) - n, dtype=np.float64)


_BAND_SHIFTS: Final = -np.asarray(EXPECTED_SIGMAS, dtype=np.float64)
"""pyhf's n of each band: the -2 sigma (lowest) expected limit is the test statistic at +2."""


def _phi(x: FloatArray) -> FloatArray:
    return np.asarray(np.exp(log_ndtr(x)), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class LimitInputs:
    """Many limits at once, one row each, bins padded to a common width.

    `counts`, `background`, `delta` (the background's 1-sigma shift, >= 0) and `signal`
    (the signal fraction per bin) are (N, K) arrays; padded bins hold zero signal and
    zero shift (they add a constant to every likelihood).
    """

    counts: FloatArray
    background: FloatArray
    delta: FloatArray
    signal: FloatArray

    @classmethod
    def build(
        cls,
        counts: npt.ArrayLike,
        background: npt.ArrayLike,
        delta: npt.ArrayLike,
        signal: npt.ArrayLike,
    ) -> LimitInputs:
        """Check and pack (N, K) or (K,) arrays (one row); InvalidInputError names the fault."""
        arrays = [
            np.atleast_2d(np.asarray(a, dtype=np.float64))
            for a in (counts, background, delta, signal)
        ]
        n, b, d, g = arrays
        if not (n.shape == b.shape == d.shape == g.shape) or n.ndim != 2 or n.shape[1] == 0:
            raise InvalidInputError(
                "limit inputs need counts, background, delta and signal of one shape (N, K), "
                f"found {[a.shape for a in arrays]}"
            )
        for name, values in zip(("counts", "background", "delta", "signal"), arrays, strict=True):
            if not np.all(np.isfinite(values)) or np.any(values < 0):
                raise InvalidInputError(
                    f"limit input {name} must be finite and non-negative; found "
                    f"{values[~np.isfinite(values) | (values < 0)][:5].tolist()}"
                )
        if np.any(g.sum(axis=1) <= 0):
            raise InvalidInputError(
                "a limit's signal template is zero in every bin of its window; the signal "
                "lies outside the bins given"
            )
        if np.any(g.sum(axis=1) > 1 + 1e-9):
            raise InvalidInputError("signal fractions of a limit add up to more than 1")
        return cls(n, np.maximum(b, MIN_BACKGROUND), d, g)

    @property
    def size(self) -> int:
        """Number of limits."""
        return int(self.counts.shape[0])

    def take(self, rows: npt.NDArray[np.intp]) -> LimitInputs:
        """The limits of `rows` (indices, repeats allowed)."""
        return LimitInputs(
            self.counts[rows], self.background[rows], self.delta[rows], self.signal[rows]
        )


def _nll(lam: FloatArray, n: FloatArray, theta: FloatArray, aux: FloatArray) -> FloatArray:
    """-ln L up to data constants: Poisson terms plus the unit Gaussian constraint."""
    return np.asarray(
        np.sum(lam - xlogy(n, lam), axis=1) + 0.5 * (theta - aux) ** 2, dtype=np.float64
    )


def _profile_theta(
    strength: FloatArray,
    counts: FloatArray,
    inputs: LimitInputs,
    aux: FloatArray,
    start: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray]:
    """theta^^(S) and the NLL there, for each row's S (events), by safeguarded Newton steps.

    The NLL is strictly convex in theta (constraint curvature 1). A step never crosses
    the bound where a bin with events would reach lambda = 0 (it goes at most half way)
    and is projected onto theta >= the bound where an empty bin reaches lambda = 0.
    """
    d, g, b = inputs.delta, inputs.signal, inputs.background
    base = strength[:, None] * g + b
    with np.errstate(divide="ignore"):
        limit = np.where(d > 0, -base / np.where(d > 0, d, 1.0), -np.inf)
    has_events = counts > 0
    bound_empty = np.where(has_events, -np.inf, limit).max(axis=1)
    bound_events = np.where(has_events, limit, -np.inf).max(axis=1)
    theta = (aux.copy() if start is None else start.copy()).astype(np.float64)
    theta = np.maximum(theta, bound_empty)
    inside = np.isfinite(bound_events)
    theta[inside] = np.where(
        theta[inside] <= bound_events[inside], 0.5 * bound_events[inside], theta[inside]
    )
    active = np.ones(theta.size, dtype=bool)
    for _ in range(_MAX_NEWTON):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        lam = base[rows] + theta[rows, None] * d[rows]
        n = counts[rows]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(n > 0, n / lam, 0.0)
            ratio_2 = np.where(n > 0, ratio / lam, 0.0)
        gradient = np.sum(d[rows] * (1.0 - ratio), axis=1) + theta[rows] - aux[rows]
        curvature = np.sum(d[rows] ** 2 * ratio_2, axis=1) + 1.0
        step = -gradient / curvature
        new = theta[rows] + step
        floor = bound_events[rows]
        new = np.where(new <= floor, 0.5 * (theta[rows] + floor), new)
        new = np.maximum(new, bound_empty[rows])
        change = np.abs(new - theta[rows])
        theta[rows] = new
        active[rows] = change > 1e-10 * (1.0 + np.abs(new))
    if np.any(active):
        raise FitError(
            f"the nuisance fit did not converge for {int(active.sum())} limit(s) after "
            f"{_MAX_NEWTON} Newton steps; check the background and its uncertainty"
        )
    lam = base + theta[:, None] * d
    nll = _nll(lam, counts, theta, aux)
    if not (np.all(np.isfinite(theta)) and np.all(np.isfinite(nll))):
        raise FitError(
            "the nuisance fit gave a non-finite likelihood for "
            f"{int(np.sum(~np.isfinite(nll)))} limit(s); check the background and its "
            "uncertainty"
        )
    return theta, nll


def _profile_derivative(
    strength: FloatArray, theta: FloatArray, counts: FloatArray, inputs: LimitInputs
) -> FloatArray:
    """dNLL/dS along the profile (envelope theorem): sum g (1 - n / lambda)."""
    lam = strength[:, None] * inputs.signal + inputs.background + theta[:, None] * inputs.delta
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(counts > 0, counts / lam, 0.0)
    return np.asarray(np.sum(inputs.signal * (1.0 - ratio), axis=1), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class _Fits:
    """The fits a set of limits shares: observed best fit, theta^^(0), the Asimov data."""

    inputs: LimitInputs
    aux: FloatArray
    s_hat: FloatArray
    nll_hat: FloatArray
    theta_hat: FloatArray
    theta_zero: FloatArray
    asimov: FloatArray
    asimov_nll_zero: FloatArray


def _fit_signal(inputs: LimitInputs) -> _Fits:
    """S^ >= 0 and theta^ on the data; theta^^(0) and the Asimov data set of S = 0."""
    rows = inputs.size
    aux = np.zeros(rows)
    zero = np.zeros(rows)
    theta_zero, nll_zero = _profile_theta(zero, inputs.counts, inputs, aux)
    slope = _profile_derivative(zero, theta_zero, inputs.counts, inputs)
    s_hat = zero.copy()
    theta_hat = theta_zero.copy()
    nll_hat = nll_zero.copy()
    positive = np.flatnonzero(slope < 0)
    if positive.size:
        sub = inputs.take(positive)
        counts = sub.counts
        sub_aux = aux[positive]

        def derivative(values: FloatArray, rows_of: npt.NDArray[np.intp]) -> FloatArray:
            part = sub.take(rows_of)
            theta, _ = _profile_theta(values, part.counts, part, sub_aux[rows_of])
            return _profile_derivative(values, theta, part.counts, part)

        scale = np.maximum(counts.sum(axis=1), 1.0)
        root = _increasing_root(derivative, np.zeros(positive.size), scale, positive.size)
        theta, nll = _profile_theta(root, counts, sub, sub_aux)
        s_hat[positive], theta_hat[positive], nll_hat[positive] = root, theta, nll
    # the Asimov counts are >= 0; where theta^^(0) sits on the bound of an empty bin, that
    # bin's mean is 0 up to rounding
    asimov = np.maximum(inputs.background + theta_zero[:, None] * inputs.delta, 0.0)
    asimov[asimov < 1e-12 * inputs.background] = 0.0
    asimov_nll = _nll(asimov, asimov, theta_zero, theta_zero)
    return _Fits(inputs, aux, s_hat, nll_hat, theta_hat, theta_zero, asimov, asimov_nll)


def _increasing_root(
    function: Callable[[FloatArray, npt.NDArray[np.intp]], FloatArray],
    low: FloatArray,
    guess: FloatArray,
    size: int,
) -> FloatArray:
    """Root in S > low of an increasing function, negative at `low`: bracket, then bisect."""
    high = guess.copy()
    rows = np.arange(size)
    value = function(high, rows)
    for _ in range(_MAX_EXPAND):
        short = np.flatnonzero(value < 0)
        if short.size == 0:
            break
        low[short] = high[short]
        high[short] *= 4.0
        value[short] = function(high[short], short)
    else:
        raise FitError("the best-fit signal yield could not be bracketed; check the inputs")
    for _ in range(_MAX_ROOT):
        width = high - low
        open_rows = np.flatnonzero(width > 1e-8 * np.maximum(high, 1e-300))
        if open_rows.size == 0:
            break
        middle = 0.5 * (low[open_rows] + high[open_rows])
        sign = function(middle, open_rows)
        above = sign >= 0
        high[open_rows[above]] = middle[above]
        low[open_rows[~above]] = middle[~above]
    return 0.5 * (low + high)


def _q_observed(fits: _Fits, rows: npt.NDArray[np.intp], strength: FloatArray) -> FloatArray:
    """q~_S on the observed data (0 where S <= S^)."""
    part = fits.inputs.take(rows)
    _, nll = _profile_theta(strength, part.counts, part, fits.aux[rows], fits.theta_hat[rows])
    q = 2.0 * (nll - fits.nll_hat[rows])
    return np.where(strength > fits.s_hat[rows], np.maximum(q, 0.0), 0.0)


def _q_asimov(fits: _Fits, rows: npt.NDArray[np.intp], strength: FloatArray) -> FloatArray:
    """q_{S,A} on the Asimov data of S = 0 (its best fit is S = 0, theta^^(0))."""
    part = fits.inputs.take(rows)
    aux = fits.theta_zero[rows]
    _, nll = _profile_theta(strength, fits.asimov[rows], part, aux, aux)
    return np.maximum(2.0 * (nll - fits.asimov_nll_zero[rows]), 0.0)


def _log_cls(q: FloatArray, q_asimov: FloatArray) -> FloatArray:
    """The log of CL_s in the q~ asymptotics (pyhf's qtilde convention)."""
    root_q = np.sqrt(q)
    root_a = np.sqrt(np.maximum(q_asimov, 1e-300))
    t = np.where(root_q <= root_a, root_q - root_a, (q - q_asimov) / (2.0 * root_a))
    return np.asarray(log_ndtr(-(t + root_a)) - log_ndtr(-t), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class HypoTest:
    """CL_s at a tested signal yield: observed and the expected bands (`EXPECTED_SIGMAS`)."""

    cls_observed: FloatArray
    cls_expected: FloatArray = field(repr=False)
    q_observed: FloatArray = field(repr=False)
    q_asimov: FloatArray = field(repr=False)


def cls_hypotest(strength: npt.ArrayLike, inputs: LimitInputs) -> HypoTest:
    """CL_s of each row at signal yield `strength` (events; one per row, or one for all)."""
    values = np.broadcast_to(np.asarray(strength, dtype=np.float64), (inputs.size,)).copy()
    if not np.all(np.isfinite(values)) or np.any(values <= 0):
        raise InvalidInputError("tested signal yields must be finite and positive (events)")
    fits = _fit_signal(inputs)
    rows = np.arange(inputs.size)
    q = _q_observed(fits, rows, values)
    q_a = _q_asimov(fits, rows, values)
    root_a = np.sqrt(np.maximum(q_a, 1e-300))
    n = _BAND_SHIFTS
    log_expected = log_ndtr(-(n[None, :] + root_a[:, None])) - log_ndtr(-n[None, :])
    return HypoTest(np.exp(_log_cls(q, q_a)), np.exp(log_expected), q, q_a)


@dataclass(frozen=True, eq=False)
class Limits:
    """Upper limits on the signal yield S (events), one per row of the inputs.

    `expected` is (N, 5) in the order of `EXPECTED_SIGMAS` (-2, -1, median, +1, +2 sigma);
    `signal_hat` the best-fit yield S^ >= 0.
    """

    observed: FloatArray
    expected: FloatArray
    signal_hat: FloatArray
    cl: float
    method: LimitMethod
    counting: BoolArray
    """True where the limit is the exact CL_s of the window count (a low count)."""


def _solve_log(
    function: Callable[[npt.NDArray[np.intp], FloatArray], FloatArray],
    low: FloatArray,
    high: FloatArray,
    f_low: FloatArray,
    f_high: FloatArray,
) -> FloatArray:
    """Roots of decreasing f(S) (f(low) > 0 > f(high)) by Illinois steps in x = ln S."""
    x_low, x_high = np.log(low), np.log(high)
    f_low, f_high = f_low.copy(), f_high.copy()
    side = np.zeros(low.size, dtype=np.int8)
    result = 0.5 * (x_low + x_high)
    active = np.ones(low.size, dtype=bool)
    for iteration in range(_MAX_ROOT):
        rows = np.flatnonzero(active)
        if rows.size == 0:
            break
        fl, fh = f_low[rows], f_high[rows]
        xl, xh = x_low[rows], x_high[rows]
        x = np.where(fl != fh, xl - fl * (xh - xl) / (fh - fl), 0.5 * (xl + xh))
        if iteration % 6 == 5:  # a bisection now and then: the bracket shrinks whatever f does
            x = 0.5 * (xl + xh)
        x = np.clip(x, np.minimum(xl, xh), np.maximum(xl, xh))
        value = function(rows, np.exp(x))
        positive = value > 0
        # keep the bracket: f(x_low) > 0 >= f(x_high)
        low_rows, high_rows = rows[positive], rows[~positive]
        x_low[low_rows], f_low[low_rows] = x[positive], value[positive]
        x_high[high_rows], f_high[high_rows] = x[~positive], value[~positive]
        # Illinois: halve the stale end's value when the same end moves twice
        repeat_low = low_rows[side[low_rows] == 1]
        f_high[repeat_low] *= 0.5
        repeat_high = high_rows[side[high_rows] == -1]
        f_low[repeat_high] *= 0.5
        side[low_rows], side[high_rows] = 1, -1
        result[rows] = x
        done = (np.abs(x_high[rows] - x_low[rows]) < ROOT_RTOL) | (np.abs(value) < 1e-12)
        active[rows[done]] = False
    if np.any(active):
        raise FitError(f"{int(active.sum())} limit(s) did not converge in {_MAX_ROOT} steps")
    return np.asarray(np.exp(result), dtype=np.float64)


def _bracket(
    function: Callable[[npt.NDArray[np.intp], FloatArray], FloatArray],
    guess: FloatArray,
    minimum: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """[low, high] with f(low) > 0 > f(high) for decreasing f, from a guess (low >= minimum)."""
    size = guess.size
    rows = np.arange(size)
    low = np.maximum(0.7 * guess, minimum)
    high = np.maximum(1.4 * guess, 1.4 * low)
    f_low = function(rows, low)
    f_high = function(rows, high)
    for _ in range(_MAX_EXPAND):
        bad = np.flatnonzero(f_low <= 0)
        if bad.size == 0:
            break
        high[bad], f_high[bad] = low[bad], f_low[bad]
        low[bad] = np.maximum(low[bad] / 8.0, minimum[bad])
        stuck = low[bad] <= minimum[bad] * (1 + 1e-12)
        f_low[bad] = function(bad, low[bad])
        if np.any(stuck & (f_low[bad] <= 0)):
            raise FitError("a limit lies below the smallest tested signal yield")
    else:
        raise FitError("the lower end of a limit could not be bracketed")
    for _ in range(_MAX_EXPAND):
        bad = np.flatnonzero(f_high > 0)
        if bad.size == 0:
            break
        low[bad], f_low[bad] = high[bad], f_high[bad]
        high[bad] *= 8.0
        f_high[bad] = function(bad, high[bad])
    else:
        raise FitError("the upper end of a limit could not be bracketed")
    return low, high, f_low, f_high


def _asimov_sigma(fits: _Fits) -> FloatArray:
    """Gaussian width of S^ on the Asimov data (Fisher information, theta profiled)."""
    inputs = fits.inputs
    lam = np.maximum(fits.asimov, MIN_BACKGROUND)
    g, d = inputs.signal, inputs.delta
    i_ss = np.sum(g * g / lam, axis=1)
    i_st = np.sum(g * d / lam, axis=1)
    i_tt = np.sum(d * d / lam, axis=1) + 1.0
    information = np.maximum(i_ss - i_st**2 / i_tt, 1e-300)
    return np.asarray(1.0 / np.sqrt(information), dtype=np.float64)


def _asymptotic_limits(inputs: LimitInputs, cl: float) -> Limits:
    alpha = 1.0 - cl
    fits = _fit_signal(inputs)
    n_rows = inputs.size
    targets = expected_targets(cl)
    # a guess that holds in the Gaussian and in the Poisson (tiny background) regimes
    sigma = _asimov_sigma(fits)
    median_guess = np.maximum(targets[2] * sigma, 1.0)
    tiny = 1e-8 * np.maximum(median_guess, 1.0)

    expected = np.empty((n_rows, len(EXPECTED_SIGMAS)))
    band_rows = np.repeat(np.arange(n_rows), len(EXPECTED_SIGMAS))
    band_targets = np.tile(targets, n_rows)

    def expected_gap(rows: npt.NDArray[np.intp], strength: FloatArray) -> FloatArray:
        q_a = _q_asimov(fits, band_rows[rows], strength)
        return np.asarray(band_targets[rows] - np.sqrt(q_a), dtype=np.float64)

    guess = np.maximum(band_targets * sigma[band_rows], 0.3 * median_guess[band_rows])
    low, high, f_low, f_high = _bracket(expected_gap, guess, tiny[band_rows])
    expected[:] = _solve_log(expected_gap, low, high, f_low, f_high).reshape(
        n_rows, len(EXPECTED_SIGMAS)
    )

    rows_all = np.arange(n_rows)
    log_alpha = math.log(alpha)

    def observed_gap(rows: npt.NDArray[np.intp], strength: FloatArray) -> FloatArray:
        q = _q_observed(fits, rows_all[rows], strength)
        q_a = _q_asimov(fits, rows_all[rows], strength)
        return _log_cls(q, q_a) - log_alpha

    start = np.maximum(fits.s_hat + expected[:, 2], tiny)
    low, high, f_low, f_high = _bracket(observed_gap, start, np.maximum(fits.s_hat, tiny))
    observed = _solve_log(observed_gap, low, high, f_low, f_high)
    return Limits(observed, expected, fits.s_hat, cl, "asymptotic", np.zeros(n_rows, dtype=bool))


# ---------------------------------------------------------------- exact CLs of the window count


@dataclass(frozen=True, eq=False)
class WindowCounts:
    """Each limit's window summed into one counting experiment.

    `counts` n, `background` b and `delta` (its 1-sigma uncertainty: the sum of the bins'
    shifts, the fully correlated shape nuisance summed) in events, `signal` the fraction G
    of the signal inside the window. Padded bins (no signal) are left out.
    """

    counts: FloatArray
    background: FloatArray
    delta: FloatArray
    signal: FloatArray

    @classmethod
    def of(cls, inputs: LimitInputs) -> WindowCounts:
        """The window sums of every row of `inputs`."""
        inside = inputs.signal > 0
        return cls(
            np.sum(inputs.counts * inside, axis=1),
            np.sum(inputs.background * inside, axis=1),
            np.sum(inputs.delta * inside, axis=1),
            np.sum(inputs.signal, axis=1),
        )


def window_background(inputs: LimitInputs) -> FloatArray:
    """The fitted background inside each limit's window (events)."""
    return WindowCounts.of(inputs).background


def _background_nodes(background: FloatArray, delta: FloatArray) -> FloatArray:
    """`PRIOR_NODES` equal-probability values of b' ~ N(b, delta) truncated to b' >= 0.

    The midpoints in probability of the truncated Gaussian, (N, PRIOR_NODES): the mean of a
    function over them is its integral over the prior by the midpoint rule.
    """
    spread = np.where(delta > 0, delta, 1.0)
    below = np.where(delta > 0, ndtr(-background / spread), 0.0)
    levels = (np.arange(PRIOR_NODES) + 0.5) / PRIOR_NODES
    probability = below[:, None] + (1.0 - below[:, None]) * levels[None, :]
    nodes = background[:, None] + delta[:, None] * ndtri(probability)
    return np.asarray(np.maximum(nodes, 0.0), dtype=np.float64)


def _count_quantiles(nodes: FloatArray, levels: FloatArray) -> FloatArray:
    """Per row and level q, the smallest count k with P(N <= k) >= q (N Poisson over the prior)."""
    pmf = np.exp(-nodes)
    cdf = pmf.mean(axis=1)
    result = np.full((nodes.shape[0], levels.size), -1.0)
    for k in range(_MAX_COUNT):
        reached = (result < 0) & (cdf[:, None] >= levels[None, :] * (1.0 - 1e-12))
        result[reached] = float(k)
        if np.all(result >= 0):
            return result
        pmf = pmf * nodes / (k + 1)
        cdf = cdf + pmf.mean(axis=1)
    raise FitError(f"a window expects more than {_MAX_COUNT} background events; not a low count")


def _counting_log_cls(
    strength: FloatArray, counts: FloatArray, signal: FloatArray, nodes: FloatArray
) -> FloatArray:
    """The log of CL_s = P(N <= n | S G + b') / P(N <= n | b'), each averaged over the prior."""
    upper = counts[:, None] + 1.0
    signal_plus = np.mean(gammaincc(upper, strength[:, None] * signal[:, None] + nodes), axis=1)
    background_only = np.mean(gammaincc(upper, nodes), axis=1)
    ratio = np.maximum(signal_plus, 1e-300) / np.maximum(background_only, 1e-300)
    return np.asarray(np.log(ratio), dtype=np.float64)


def _counting_limits(inputs: LimitInputs, cl: float) -> Limits:
    """Exact CL_s of each window's count (module docstring), observed and expected."""
    window = WindowCounts.of(inputs)
    nodes = _background_nodes(window.background, window.delta)
    levels = _phi(np.asarray(EXPECTED_SIGMAS, dtype=np.float64))
    tested = np.column_stack([_count_quantiles(nodes, levels), window.counts])
    n_rows, n_columns = tested.shape
    rows_of = np.repeat(np.arange(n_rows), n_columns)
    counts = tested.ravel()
    log_alpha = math.log(1.0 - cl)

    def gap(rows: npt.NDArray[np.intp], strength: FloatArray) -> FloatArray:
        owner = rows_of[rows]
        log_cls = _counting_log_cls(strength, counts[rows], window.signal[owner], nodes[owner])
        return np.asarray(log_cls - log_alpha, dtype=np.float64)

    guess = (counts + 3.0 + 2.0 * np.sqrt(counts + 1.0)) / window.signal[rows_of]
    tiny = 1e-8 * guess
    low, high, f_low, f_high = _bracket(gap, guess, tiny)
    solved = _solve_log(gap, low, high, f_low, f_high).reshape(n_rows, n_columns)
    signal_hat = np.maximum(window.counts - window.background, 0.0) / window.signal
    return Limits(
        solved[:, -1], solved[:, :-1], signal_hat, cl, "poisson", np.ones(n_rows, dtype=bool)
    )


def _chunked(
    solve: Callable[[LimitInputs, float], Limits], inputs: LimitInputs, cl: float, chunk: int
) -> Limits:
    parts = [
        solve(inputs.take(np.arange(start, min(start + chunk, inputs.size))), cl)
        for start in range(0, inputs.size, chunk)
    ]
    return Limits(
        np.concatenate([p.observed for p in parts]),
        np.concatenate([p.expected for p in parts]),
        np.concatenate([p.signal_hat for p in parts]),
        cl,
        parts[0].method,
        np.concatenate([p.counting for p in parts]),
    )


def cls_upper_limits(
    inputs: LimitInputs,
    *,
    cl: float = DEFAULT_CL,
    method: LimitMethod = "auto",
    chunk: int = 20_000,
) -> Limits:
    """Observed and expected CL_s upper limits on S (events) of every row of `inputs`.

    "auto" (default): the exact CL_s of the window count where the window background is
    below `LOW_COUNT_BACKGROUND` events, the asymptotic profile-likelihood path elsewhere;
    "asymptotic" or "poisson": one of them for every row; "pyhf": the asymptotic model in
    pyhf, one limit at a time (the reference, slow). `Limits.counting` marks the rows solved
    by the count. Rows go `chunk` at a time.
    """
    if not (0.5 < cl < 1.0):
        raise InvalidInputError(f"the confidence level must lie in (0.5, 1), got {cl}")
    if inputs.size == 0:
        raise InvalidInputError("no limit to compute: the inputs hold no row")
    if method == "pyhf":
        return _pyhf_limits(inputs, cl)
    if method == "asymptotic":
        return _chunked(_asymptotic_limits, inputs, cl, chunk)
    if method == "poisson":
        return _chunked(_counting_limits, inputs, cl, chunk)
    if method != "auto":
        raise InvalidInputError(
            f"unknown limit method {method!r}; use 'auto', 'asymptotic', 'poisson' or 'pyhf'"
        )
    low = window_background(inputs) < LOW_COUNT_BACKGROUND
    observed = np.empty(inputs.size)
    expected = np.empty((inputs.size, len(EXPECTED_SIGMAS)))
    signal_hat = np.empty(inputs.size)
    for rows, solve in (
        (np.flatnonzero(low), _counting_limits),
        (np.flatnonzero(~low), _asymptotic_limits),
    ):
        if rows.size:
            part = _chunked(solve, inputs.take(rows), cl, chunk)
            observed[rows], expected[rows], signal_hat[rows] = (
                part.observed,
                part.expected,
                part.signal_hat,
            )
    return Limits(observed, expected, signal_hat, cl, "auto", low)


# ---------------------------------------------------------------- the pyhf reference


def pyhf_model(
    background: Sequence[float], delta: Sequence[float], signal: Sequence[float]
) -> object:
    """The HistFactory model of one limit: signal (POI `mu`) + background with one histosys."""
    import pyhf

    b = [float(x) for x in background]
    d = [float(x) for x in delta]
    spec = {
        "channels": [
            {
                "name": "window",
                "samples": [
                    {
                        "name": "signal",
                        "data": [float(x) for x in signal],
                        "modifiers": [{"name": "mu", "type": "normfactor", "data": None}],
                    },
                    {
                        "name": "background",
                        "data": b,
                        "modifiers": [
                            {
                                "name": "fit_uncertainty",
                                "type": "histosys",
                                "data": {
                                    "hi_data": [x + y for x, y in zip(b, d, strict=True)],
                                    "lo_data": [x - y for x, y in zip(b, d, strict=True)],
                                },
                            }
                        ],
                    },
                ],
            }
        ]
    }
    return pyhf.Model(spec, poi_name="mu", validate=False)


def _pyhf_bounds(model: object, poi_high: float) -> list[tuple[float, float]]:
    config = model.config  # type: ignore[attr-defined]
    bounds = [(float(b[0]), float(b[1])) for b in config.suggested_bounds()]
    bounds[config.poi_index] = (0.0, poi_high)
    return bounds


def pyhf_hypotest(strength: float, counts: Sequence[float], inputs: LimitInputs) -> HypoTest:
    """`pyhf.infer.hypotest` (qtilde, asymptotics) of the single row of `inputs` at S."""
    import pyhf

    if inputs.size != 1:
        raise InvalidInputError("pyhf_hypotest takes one limit (one row)")
    pyhf.set_backend("numpy")
    scale = float(strength)
    model = pyhf_model(inputs.background[0], inputs.delta[0], inputs.signal[0] * scale)
    data = [float(x) for x in counts] + model.config.auxdata  # type: ignore[attr-defined]
    observed, expected = pyhf.infer.hypotest(
        1.0,
        data,
        model,
        test_stat="qtilde",
        return_expected_set=True,
        par_bounds=_pyhf_bounds(model, 1e3),
    )
    values = np.asarray([float(v) for v in expected])
    return HypoTest(
        np.asarray([float(observed)]), values[None, :], np.full(1, np.nan), np.full(1, np.nan)
    )


def _pyhf_limits(inputs: LimitInputs, cl: float) -> Limits:
    import pyhf
    from pyhf.infer.intervals.upper_limits import toms748_scan

    pyhf.set_backend("numpy")
    # the asymptotic path supplies each limit's scale, so that mu is of order one for pyhf
    guide = _asymptotic_limits(inputs, cl)
    observed = np.empty(inputs.size)
    expected = np.empty((inputs.size, len(EXPECTED_SIGMAS)))
    for row in range(inputs.size):
        scale = float(guide.expected[row, 2])
        model = pyhf_model(inputs.background[row], inputs.delta[row], inputs.signal[row] * scale)
        data = [float(x) for x in inputs.counts[row]] + model.config.auxdata  # type: ignore[attr-defined]
        upper = 4.0 * max(guide.observed[row], guide.expected[row, -1]) / scale
        obs, exp = toms748_scan(
            data,
            model,
            0.2 * min(guide.observed[row], guide.expected[row, 0]) / scale,
            upper,
            level=1.0 - cl,
            rtol=1e-5,
            test_stat="qtilde",
            par_bounds=_pyhf_bounds(model, 50.0 * upper),
        )
        observed[row] = float(obs) * scale
        expected[row] = np.asarray([float(v) for v in exp]) * scale
    if not (np.all(np.isfinite(observed)) and np.all(np.isfinite(expected))):
        raise FitError("pyhf returned a limit that is not finite")
    return Limits(
        observed, expected, guide.signal_hat, cl, "pyhf", np.zeros(inputs.size, dtype=bool)
    )


# ---------------------------------------------------------------- limits of a spectrum


def limit_masses(low_gev: float, high_gev: float, n_masses: int = DEFAULT_N_MASSES) -> FloatArray:
    """`n_masses` log-spaced signal masses strictly inside the fit range [low, high] GeV."""
    if not (math.isfinite(low_gev) and math.isfinite(high_gev) and 0 < low_gev < high_gev):
        raise InvalidInputError(
            f"a fit range needs 0 < low < high GeV, got [{low_gev}, {high_gev}]"
        )
    if not 1 <= n_masses <= 1000:
        raise InvalidInputError(f"n_masses must lie in [1, 1000], got {n_masses}")
    return np.asarray(np.geomspace(low_gev, high_gev, n_masses + 2)[1:-1], dtype=np.float64)


@dataclass(frozen=True, eq=False)
class SignalWindows:
    """The windows of many (mass, width) signals on one spectrum, packed for `cls_upper_limits`.

    `masses` (GeV), `widths` (fractions), `sigma` (GeV) and `bins` ([first, stop) within the
    fit range) per row; `inputs` the packed likelihood inputs.
    """

    masses: FloatArray
    widths: FloatArray
    sigma: FloatArray
    bins: npt.NDArray[np.int64]
    signal_in_window: FloatArray
    window_background: FloatArray
    inputs: LimitInputs


def signal_windows(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
    background_error: npt.ArrayLike,
    masses: npt.ArrayLike,
    widths: Sequence[float],
) -> tuple[SignalWindows, list[tuple[float, float, str]]]:
    """Windows of every (mass, width) inside the fit range, and the pairs left out with why.

    `edges` (K + 1, GeV), `counts`, `background` and `background_error` (K) cover the fit
    range only. A signal whose window m +- 2 sigma_s leaves the range is left out (the
    background is not defined beyond it).
    """
    e = np.asarray(edges, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    s = np.asarray(background_error, dtype=np.float64)
    if e.ndim != 1 or e.size < 2 or not (n.shape == b.shape == s.shape == (e.size - 1,)):
        raise InvalidInputError(
            f"a spectrum's limits need K + 1 edges and K counts, background and errors; found "
            f"{e.shape}, {n.shape}, {b.shape}, {s.shape}"
        )
    if np.any(np.diff(e) <= 0):
        raise InvalidInputError("bin edges must increase strictly")
    rows: list[tuple[float, float, float, int, int]] = []
    skipped: list[tuple[float, float, str]] = []
    for width in widths:
        sigma = signal_sigma(np.asarray(masses, dtype=np.float64), float(width))
        for mass, sig in zip(np.asarray(masses, dtype=np.float64), sigma, strict=True):
            low, high = mass - WINDOW_SIGMAS * sig, mass + WINDOW_SIGMAS * sig
            if low < e[0] or high > e[-1]:
                skipped.append(
                    (
                        float(mass),
                        float(width),
                        f"the window {low:.0f}-{high:.0f} GeV (m +- {WINDOW_SIGMAS:g} sigma) "
                        f"leaves the fit range {e[0]:.0f}-{e[-1]:.0f} GeV",
                    )
                )
                continue
            first = int(np.searchsorted(e, low, side="right")) - 1
            stop = int(np.searchsorted(e, high, side="left"))
            rows.append((float(mass), float(width), float(sig), first, max(stop, first + 1)))
    if not rows:
        empty = np.zeros((0, 1))
        return (
            SignalWindows(
                np.zeros(0),
                np.zeros(0),
                np.zeros(0),
                np.zeros((0, 2), dtype=np.int64),
                np.zeros(0),
                np.zeros(0),
                LimitInputs(empty, empty, empty, empty),
            ),
            skipped,
        )
    size = max(stop - first for *_, first, stop in rows)
    shape = (len(rows), size)
    packed = {key: np.zeros(shape) for key in ("n", "b", "d", "g")}
    packed["b"][:] = 1.0
    for index, (mass, _, sig, first, stop) in enumerate(rows):
        k = stop - first
        packed["n"][index, :k] = n[first:stop]
        packed["b"][index, :k] = b[first:stop]
        packed["d"][index, :k] = s[first:stop]
        packed["g"][index, :k] = gaussian_bin_fractions(e[first : stop + 1], mass, sig)
    inputs = LimitInputs.build(packed["n"], packed["b"], packed["d"], packed["g"])
    return (
        SignalWindows(
            masses=np.array([r[0] for r in rows]),
            widths=np.array([r[1] for r in rows]),
            sigma=np.array([r[2] for r in rows]),
            bins=np.array([[r[3], r[4]] for r in rows], dtype=np.int64),
            signal_in_window=inputs.signal.sum(axis=1),
            window_background=window_background(inputs),
            inputs=inputs,
        ),
        skipped,
    )


def stack_inputs(parts: Sequence[LimitInputs]) -> LimitInputs:
    """One `LimitInputs` of the rows of all `parts`, padded to the widest window."""
    parts = [p for p in parts if p.size]
    if not parts:
        raise InvalidInputError("no limit to compute: every part is empty")
    width = max(p.counts.shape[1] for p in parts)
    rows = sum(p.size for p in parts)
    arrays = {key: np.zeros((rows, width)) for key in ("n", "b", "d", "g")}
    arrays["b"][:] = 1.0
    start = 0
    for part in parts:
        stop = start + part.size
        k = part.counts.shape[1]
        arrays["n"][start:stop, :k] = part.counts
        arrays["b"][start:stop, :k] = part.background
        arrays["d"][start:stop, :k] = part.delta
        arrays["g"][start:stop, :k] = part.signal
        start = stop
    return LimitInputs(arrays["n"], arrays["b"], arrays["d"], arrays["g"])


@dataclass(frozen=True, eq=False)
class SpectrumBackground:
    """One accepted spectrum at one AR point, over its fit range: what a limit needs.

    `edges` (K + 1, GeV), `counts`, `background` (the accepted fit per bin) and
    `background_error` (its 1-sigma fit uncertainty per bin).
    """

    spectrum: str
    point_pb: float
    edges: FloatArray
    counts: FloatArray
    background: FloatArray
    background_error: FloatArray


@dataclass(frozen=True, eq=False)
class LimitCurve:
    """The limits of one spectrum, AR point and width against mass.

    Yields in events (S), cross sections sigma x A x eff in pb (S / L); `expected_*` are
    (n_masses, 5) in the order of `EXPECTED_SIGMAS`; `window_background` the fitted
    background in each window (events): below `LOW_COUNT_BACKGROUND` the default solves the
    window as a count (`counting`; module docstring).
    """

    spectrum: str
    point_pb: float
    width: float
    masses: FloatArray
    sigma: FloatArray
    signal_in_window: FloatArray
    window_background: FloatArray
    observed_events: FloatArray
    expected_events: FloatArray
    observed_pb: FloatArray
    expected_pb: FloatArray
    counting: BoolArray
    """True where the limit is the exact CL_s of the window count (`Limits.counting`)."""


@dataclass(frozen=True)
class SkippedLimit:
    """A (spectrum, point, width, mass) without a limit, and why."""

    spectrum: str
    point_pb: float
    width: float
    mass: float
    reason: str


def spectrum_limits(
    spectra: Sequence[SpectrumBackground],
    lumi_pb: float,
    *,
    widths: Sequence[float] = DEFAULT_WIDTHS,
    n_masses: int = DEFAULT_N_MASSES,
    cl: float = DEFAULT_CL,
    method: LimitMethod = "auto",
) -> tuple[list[LimitCurve], list[SkippedLimit]]:
    """Limit curves of every spectrum and width at `n_masses` masses across its fit range.

    `lumi_pb` (pb^-1) is the luminosity of the events in the spectra (the search luminosity
    (1 - f) L of an anomaly region). All limits of all spectra are solved in one batch.
    """
    if not (math.isfinite(lumi_pb) and lumi_pb > 0):
        raise InvalidInputError(
            f"the luminosity must be finite and positive (pb^-1), got {lumi_pb}"
        )
    if not widths or len(set(widths)) != len(widths):
        raise InvalidInputError(f"give distinct signal widths, got {list(widths)}")
    windows: list[SignalWindows] = []
    skipped: list[SkippedLimit] = []
    for item in spectra:
        masses = limit_masses(float(item.edges[0]), float(item.edges[-1]), n_masses)
        packed, left_out = signal_windows(
            item.edges, item.counts, item.background, item.background_error, masses, widths
        )
        windows.append(packed)
        skipped.extend(
            SkippedLimit(item.spectrum, item.point_pb, width, mass, reason)
            for mass, width, reason in left_out
        )
    filled = [w for w in windows if w.inputs.size]
    if not filled:
        return [], skipped
    limits = cls_upper_limits(stack_inputs([w.inputs for w in filled]), cl=cl, method=method)
    curves: list[LimitCurve] = []
    start = 0
    for item, packed in zip(spectra, windows, strict=True):
        stop = start + packed.inputs.size
        observed = limits.observed[start:stop]
        expected = limits.expected[start:stop]
        counting = limits.counting[start:stop]
        for width in widths:
            rows = np.flatnonzero(packed.widths == width)
            if rows.size == 0:
                continue
            curves.append(
                LimitCurve(
                    spectrum=item.spectrum,
                    point_pb=item.point_pb,
                    width=float(width),
                    masses=packed.masses[rows],
                    sigma=packed.sigma[rows],
                    signal_in_window=packed.signal_in_window[rows],
                    window_background=packed.window_background[rows],
                    observed_events=observed[rows],
                    expected_events=expected[rows],
                    observed_pb=observed[rows] / lumi_pb,
                    expected_pb=expected[rows] / lumi_pb,
                    counting=counting[rows],
                )
            )
        start = stop
    return curves, skipped
