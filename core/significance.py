"""Significances: Z <-> p far in the tails, expected Z of s over b, and a Gaussian signal fit.

Conventions (PHYSICS.md section 6): one-sided p-values, Z = Phi^-1(1 - p) computed as
`-ndtri(p)` (or `-ndtri_exp(ln p)` from a log p-value) so that Z = 8 (p ~ 6e-16) and far
beyond keep full relative precision; p = 1 - Phi(Z) is computed as `ndtr(-Z)`.

One engine, `fit_signal_and_background`, fits every signal: a binned extended Poisson
likelihood of mu_i = B P_i + s g_i, with g_i the fraction of the signal (a Gaussian of mass
m and width sigma in GeV, `gaussian_bin_fractions`) in bin i, and the background of total B
(fixed or floating) and bin fractions P_i, either held (a given background shape) or those
of a background function whose shape parameters float (`FloatingShape`, the
spurious-signal test of core.robustness). `signal_fit` uses it with a given background;
its local significance is the likelihood ratio of the discovery test (Cowan, Cranmer,
Gross, Vitells, arXiv:1007.1727): q0 = 2 (NLL(s = 0) - NLL(s_hat)) for s_hat > 0, else 0;
Z = sqrt(q0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from iminuit import Minuit
from scipy.special import log_ndtr, ndtr, ndtri, ndtri_exp, xlogy

from core.errors import FitDidNotConvergeError, InvalidInputError
from core.fit import BinnedShape, log_sum_exp

FloatArray = npt.NDArray[np.float64]

BackgroundNormalisation = Literal["fixed", "floating"]
"""Whether the background shape keeps its given normalisation or scales by a free mu_b."""

_SERIES_BELOW: Final = 1e-4
"""Below this s/b the Asimov formula uses its series, free of cancellation."""

_BAD_NLL: Final = 1e300

UNDERFLOW_FLOOR: Final = 1e-12
"""A background bin at exactly 0 is raised to this fraction of the largest bin."""

MAX_TOTAL_COUNT: Final = 1e15
"""Largest total of a spectrum's data or background: window sums stay exact below 2^53."""


def _as_probability(p: npt.ArrayLike, name: str) -> FloatArray:
    values = np.asarray(p, dtype=np.float64)
    if np.any(np.isnan(values)) or np.any((values < 0.0) | (values > 1.0)):
        raise InvalidInputError(
            f"{name} must be probabilities in [0, 1]; found "
            f"{values[np.isnan(values) | (values < 0) | (values > 1)][:5]}; check the p-values"
        )
    return values


def z_from_p(p: npt.ArrayLike) -> FloatArray:
    """One-sided significance Z = Phi^-1(1 - p) of p-values, exact far in the tail.

    p = 0 gives +inf and p = 1 gives -inf; NaN or values outside [0, 1] raise.
    """
    values = _as_probability(p, "z_from_p input")
    return np.asarray(-ndtri(values), dtype=np.float64)


def z_from_log_p(log_p: npt.ArrayLike) -> FloatArray:
    """Z = Phi^-1(1 - p) from ln p (<= 0), valid where p itself underflows (Z >> 37)."""
    values = np.asarray(log_p, dtype=np.float64)
    if np.any(np.isnan(values)) or np.any(values > 0.0):
        raise InvalidInputError(
            "z_from_log_p needs ln p <= 0 (not NaN); found "
            f"{values[np.isnan(values) | (values > 0)][:5]}"
        )
    return np.asarray(-ndtri_exp(values), dtype=np.float64)


def p_from_z(z: npt.ArrayLike) -> FloatArray:
    """One-sided p-value p = 1 - Phi(Z), computed as Phi(-Z) so that Z = 8 is exact."""
    values = np.asarray(z, dtype=np.float64)
    if np.any(np.isnan(values)):
        raise InvalidInputError("p_from_z got NaN significances; expected real numbers")
    return np.asarray(ndtr(-values), dtype=np.float64)


def log_p_from_z(z: npt.ArrayLike) -> FloatArray:
    """Log of the one-sided p-value of Z, finite far beyond where p underflows."""
    values = np.asarray(z, dtype=np.float64)
    if np.any(np.isnan(values)):
        raise InvalidInputError("log_p_from_z got NaN significances; expected real numbers")
    return np.asarray(log_ndtr(-values), dtype=np.float64)


def expected_significance(signal: npt.ArrayLike, background: npt.ArrayLike) -> FloatArray:
    """Asimov Z = sqrt(2((s + b) ln(1 + s/b) - s)) of s >= 0 signal over b > 0 background events.

    For s << b it tends to s / sqrt(b); a series avoids the cancellation there.
    """
    s = np.asarray(signal, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    if np.any(~np.isfinite(s)) or np.any(s < 0):
        raise InvalidInputError(
            "expected_significance needs finite signal counts s >= 0; found "
            f"{s[~np.isfinite(s) | (s < 0)][:5]}"
        )
    if np.any(~np.isfinite(b)) or np.any(b <= 0):
        raise InvalidInputError(
            "expected_significance needs finite background counts b > 0; found "
            f"{b[~np.isfinite(b) | (b <= 0)][:5]}"
        )
    x = s / b
    small = x < _SERIES_BELOW
    x_big = np.where(small, 1.0, x)
    x_small = np.where(small, x, 0.0)
    exact = (1.0 + x_big) * np.log1p(x_big) - x_big
    series = x_small**2 / 2.0 - x_small**3 / 6.0 + x_small**4 / 12.0
    half_q = b * np.where(small, series, exact)
    return np.asarray(np.sqrt(2.0 * np.maximum(half_q, 0.0)), dtype=np.float64)


def ae_gain_percent(z_with_ae: float, z_without_ae: float) -> float:
    """Gain of the autoencoder selection, dZ = (Z_AE / Z - 1) x 100 (in percent)."""
    if not (math.isfinite(z_with_ae) and math.isfinite(z_without_ae)) or z_without_ae <= 0:
        raise InvalidInputError(
            f"ae_gain_percent needs finite Z values with Z (without AE) > 0; found "
            f"Z_AE={z_with_ae}, Z={z_without_ae}"
        )
    return (z_with_ae / z_without_ae - 1.0) * 100.0


@dataclass(frozen=True)
class SignalFitResult:
    """A Gaussian signal fitted on top of a background shape at one mass (GeV, counts)."""

    mass: float
    width: float
    signal_yield: float
    signal_yield_error: float
    background_scale: float
    background_scale_error: float
    background_normalisation: BackgroundNormalisation
    nll_signal_plus_background: float
    nll_background_only: float
    q0: float
    local_z: float
    local_p: float
    signal_fraction_in_range: float
    n_bins_fitted: int


def gaussian_bin_fractions(edges: npt.ArrayLike, mass: float, width: float) -> FloatArray:
    """Fraction of a Gaussian (mean `mass`, sigma `width`, GeV) inside each bin of `edges`.

    Each bin is integrated from the side of its nearer tail, so that far bins keep their
    relative precision.
    """
    if not (math.isfinite(mass) and math.isfinite(width) and width > 0):
        raise InvalidInputError(
            f"a Gaussian signal needs a finite mass and a positive width (GeV), got mass "
            f"{mass}, width {width}"
        )
    e = np.asarray(edges, dtype=np.float64)
    upper = (e - mass) / width
    left = np.diff(ndtr(upper))
    right = -np.diff(ndtr(-upper))
    return np.asarray(np.where(e[1:] <= mass, left, right), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class FloatingShape:
    """Background shape parameters floated in a signal fit: theta = `theta` + `directions` phi.

    `shape` integrates the background function over the bins of a fit range, of which those
    in `shape.problem.used` enter the likelihood; `directions` whiten theta (e.g.
    core.fit.shape_directions).
    """

    shape: BinnedShape
    theta: FloatArray
    directions: FloatArray


@dataclass(frozen=True)
class SignalAndBackgroundFit:
    """Outcome of `fit_signal_and_background`: signal yield s and background total B (events).

    `nll` is half the Poisson deviance at the minimum (the NLL up to a data constant);
    `valid` needs a valid Migrad minimum, an accurate Hesse covariance and finite numbers.
    """

    signal: float
    signal_error: float
    background_total: float
    background_total_error: float
    nll: float
    valid: bool


class _SignalAndBackgroundNLL:
    """Half the Poisson deviance of B P_i + s g_i in scaled parameters q = (a, phi, t).

    B = B0 + sqrt(B0) a, theta = theta0 + T phi (floating shape only), s = scale t: unit
    steps are about one standard deviation each.
    """

    def __init__(
        self,
        counts: FloatArray,
        background: FloatArray,
        template: FloatArray,
        floating: FloatingShape | None,
        signal_scale: float,
    ) -> None:
        self.counts = counts
        self.safe = np.where(counts > 0, counts, 1.0)
        self.total = float(background.sum())
        self.fractions = background / self.total
        self.norm_scale = math.sqrt(self.total)
        self.template = template
        self.floating = floating
        self.n_shape = 0 if floating is None else floating.directions.shape[1]
        self.signal_scale = signal_scale

    def unpack(self, q: FloatArray) -> tuple[float, FloatArray, float]:
        """Background total B, shape shift phi and signal yield s of the scaled parameters."""
        k = self.n_shape
        return (
            self.total + self.norm_scale * float(q[0]),
            np.asarray(q[1 : k + 1], dtype=np.float64),
            self.signal_scale * float(q[k + 1]),
        )

    def _pieces(
        self, q: FloatArray, with_gradient: bool
    ) -> tuple[FloatArray, FloatArray, FloatArray | None, float]:
        norm, phi, signal = self.unpack(np.asarray(q))
        fractions, centred = self.fractions, None
        if self.floating is not None:
            used = self.floating.shape.problem.used
            theta = self.floating.theta + self.floating.directions @ phi
            if with_gradient:
                log_integrals, gradient = self.floating.shape.log_integrals_and_gradient(theta)
                gradient = gradient[used] @ self.floating.directions
            else:
                log_integrals, gradient = self.floating.shape.log_integrals(theta), None
            log_integrals = log_integrals[used]
            with np.errstate(all="ignore"):
                fractions = np.exp(log_integrals - float(log_sum_exp(log_integrals)))
                if gradient is not None:
                    centred = gradient - fractions @ gradient
        with np.errstate(all="ignore"):
            mu = norm * fractions + signal * self.template
        return mu, fractions, centred, norm

    def __call__(self, q: FloatArray) -> float:
        mu = self._pieces(q, with_gradient=False)[0]
        if not np.all(mu > 0):
            return _BAD_NLL
        with np.errstate(all="ignore"):
            # summed bin by bin and kept small, so that Minuit's relative precision holds
            value = float(np.sum(mu - self.counts - xlogy(self.counts, mu / self.safe)))
        return value if math.isfinite(value) else _BAD_NLL

    def gradient(self, q: FloatArray) -> FloatArray:
        mu, fractions, centred, norm = self._pieces(q, with_gradient=True)
        if not np.all(mu > 0):
            return np.zeros(len(q))
        with np.errstate(all="ignore"):
            residual = 1.0 - self.counts / mu
            parts = [np.array([self.norm_scale * float(residual @ fractions)])]
            if centred is not None:
                parts.append(norm * (residual * fractions) @ centred)
            parts.append(np.array([self.signal_scale * float(residual @ self.template)]))
            result = np.concatenate(parts)
        return np.asarray(np.where(np.isfinite(result), result, 0.0), dtype=np.float64)


def fit_signal_and_background(
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
    template: npt.ArrayLike,
    *,
    floating_normalisation: bool = True,
    floating_shape: FloatingShape | None = None,
    fix_signal: bool = False,
    signal_starts: Sequence[float] = (0.0,),
) -> SignalAndBackgroundFit:
    """Fit mu_i = B P_i + s g_i to the counts n_i of the bins in the likelihood (Poisson).

    `background` b_i (>= 0, expected events; a bin at exactly 0, an underflowed tail of a
    fitted function, is raised to `UNDERFLOW_FLOOR` of the largest) gives the start
    B0 = sum b and, without a
    `floating_shape`, the fixed fractions P_i = b_i / B0; `template` g_i is the fraction of
    the signal in each bin. B floats when `floating_normalisation`, s (events of the whole
    signal) is fixed at 0 when `fix_signal` and bounded below so that no bin's expectation
    is negative at the start. Migrad (then strategy 2) and Hesse run from each start yield
    in turn until one gives a valid minimum with an accurate covariance.
    """
    n = np.asarray(counts, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    g = np.asarray(template, dtype=np.float64)
    if not (
        n.shape == b.shape == g.shape
        and n.ndim == 1
        and np.all(np.isfinite(b))
        and np.all(b >= 0)
        and np.any(b > 0)
    ):
        raise InvalidInputError(
            f"counts, background and template must be 1-D of one length with background >= 0 "
            f"(not all 0); found shapes {n.shape}, {b.shape}, {g.shape}"
        )
    # a fitted function can underflow to exactly 0 far in its tail: such a bin expects
    # (almost) nothing, and a signal there may not drive its mean negative
    b = np.maximum(b, UNDERFLOW_FLOOR * float(b.max()))
    signal_scale = math.sqrt(max(float(b @ g), 1.0))
    objective = _SignalAndBackgroundNLL(n, b, g, floating_shape, signal_scale)
    k = objective.n_shape
    analytic = floating_shape is None or floating_shape.shape.features is not None
    positive = g > 0
    with np.errstate(over="ignore"):
        lowest = -0.99 * float(np.min(b[positive] / g[positive])) if np.any(positive) else 0.0
    minuit: Minuit | None = None
    for start in [0.0] if fix_signal else signal_starts:
        minuit = Minuit(
            objective,
            np.concatenate([[0.0], np.zeros(k), [max(start, 0.5 * lowest) / signal_scale]]),
            grad=objective.gradient if analytic else None,
        )
        minuit.errordef = Minuit.LIKELIHOOD
        minuit.errors = np.ones(k + 2)
        minuit.limits[k + 1] = (lowest / signal_scale, None)
        minuit.fixed[0] = not floating_normalisation
        minuit.fixed[k + 1] = fix_signal
        if all(minuit.fixed):
            value = objective(np.asarray(minuit.values))
            return SignalAndBackgroundFit(0.0, 0.0, objective.total, 0.0, value, value < _BAD_NLL)
        minuit.migrad()
        if not minuit.valid:
            minuit.strategy = 2
            minuit.migrad()
        if minuit.valid:
            minuit.hesse()
        if minuit.valid and minuit.accurate:
            break
    assert minuit is not None
    norm, _, signal = objective.unpack(np.asarray(minuit.values, dtype=np.float64))
    errors = np.asarray(minuit.errors, dtype=np.float64)
    signal_error = 0.0 if fix_signal else signal_scale * float(errors[k + 1])
    norm_error = objective.norm_scale * float(errors[0]) if floating_normalisation else 0.0
    nll = float(minuit.fval) if minuit.fval is not None else _BAD_NLL
    valid = bool(
        minuit.valid
        and minuit.accurate
        and math.isfinite(signal)
        and math.isfinite(signal_error)
        and (fix_signal or signal_error > 0)
        and nll < _BAD_NLL
    )
    return SignalAndBackgroundFit(signal, signal_error, norm, norm_error, nll, valid)


def validate_spectrum(
    counts: npt.ArrayLike, background: npt.ArrayLike, edges: npt.ArrayLike | None = None
) -> tuple[FloatArray, FloatArray]:
    """Check data counts and expected background (and edges, GeV) of one spectrum.

    Raises InvalidInputError for mismatched shapes, NaN/inf, negative values, totals above
    `MAX_TOTAL_COUNT`, background <= 0 where data exist, or an all-zero background.
    Returns both as float arrays.
    """
    n = np.asarray(counts, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    if n.ndim != 1 or b.shape != n.shape or n.size == 0:
        raise InvalidInputError(
            f"expected 1D data counts and background of the same (non-zero) length; found "
            f"counts {n.shape} and background {b.shape}; give both the same length"
        )
    if edges is not None:
        e = np.asarray(edges, dtype=np.float64)
        if e.shape != (n.size + 1,):
            raise InvalidInputError(
                f"expected {n.size + 1} bin edges for {n.size} bins, found shape {e.shape}"
            )
        if not np.all(np.isfinite(e)):
            raise InvalidInputError(
                "bin edges must be finite and strictly increasing (GeV); NaN or infinite at "
                f"edges {np.flatnonzero(~np.isfinite(e))[:10].tolist()}"
            )
        if np.any(np.diff(e) <= 0):
            raise InvalidInputError(
                "bin edges must be finite and strictly increasing (GeV); they do not increase "
                f"strictly after edges {np.flatnonzero(np.diff(e) <= 0)[:10].tolist()}"
            )
    for name, values in (("data counts", n), ("background", b)):
        bad = ~np.isfinite(values)
        if np.any(bad):
            raise InvalidInputError(
                f"{name} contain NaN or infinite values at bins "
                f"{np.flatnonzero(bad)[:10].tolist()}; fix the input histogram"
            )
        if np.any(values < 0):
            raise InvalidInputError(
                f"{name} must be >= 0; negative at bins {np.flatnonzero(values < 0)[:10].tolist()}"
            )
    for name, values in (("data counts", n), ("background", b)):
        if float(values.sum()) > MAX_TOTAL_COUNT:
            raise InvalidInputError(
                f"{name} sum to {values.sum():.3g} events, above the supported "
                f"{MAX_TOTAL_COUNT:.0e} (counts must stay exact integers in float64); "
                "rescale the histogram"
            )
    missing = (b <= 0) & (n > 0)
    if np.any(missing):
        raise InvalidInputError(
            "background is zero where data exist, at bins "
            f"{np.flatnonzero(missing)[:10].tolist()}: a zero Poisson expectation can not "
            "produce them (a window there has p = 0). Extend the background model to these "
            "bins or leave them out of the histogram"
        )
    if not np.any(b > 0):
        raise InvalidInputError("background is zero in every bin; expected a background shape")
    return n, b


def signal_fit(
    counts: npt.ArrayLike,
    background: npt.ArrayLike,
    edges: npt.ArrayLike,
    mass: float,
    width: float,
    *,
    background_normalisation: BackgroundNormalisation = "fixed",
) -> SignalFitResult:
    """Fit a Gaussian signal yield at `mass` (sigma `width`, GeV) over a background shape.

    `background` holds expected counts per bin; bins where it is 0 (and data are 0) are left
    out. The yield is that of the whole Gaussian; its part outside the fitted bins is lost
    and reported as `signal_fraction_in_range`. Raises FitDidNotConvergeError when Minuit
    finds no valid minimum from any start.
    """
    n_all, b_all = validate_spectrum(counts, background, edges)
    e = np.asarray(edges, dtype=np.float64)
    if background_normalisation not in ("fixed", "floating"):
        raise InvalidInputError(
            "background_normalisation must be 'fixed' or 'floating', found "
            f"{background_normalisation!r}"
        )
    if not (math.isfinite(mass) and e[0] <= mass <= e[-1]):
        raise InvalidInputError(
            f"signal mass {mass} GeV is outside the histogram [{e[0]}, {e[-1]}] GeV"
        )
    if not (math.isfinite(width) and width > 0):
        raise InvalidInputError(f"signal width must be > 0 GeV, found {width}")
    fractions_all = gaussian_bin_fractions(e, mass, width)
    used = b_all > 0
    n, b, g = n_all[used], b_all[used], fractions_all[used]
    fraction_in_range = float(np.sum(g))
    if fraction_in_range < 1e-9:
        raise InvalidInputError(
            f"a Gaussian at {mass} GeV with width {width} GeV puts no events in the bins that "
            "have background; choose a mass inside the fitted range"
        )
    floating = background_normalisation == "floating"
    weights = g / b
    start_yield = float(np.sum(weights * (n - b)) / np.sum(weights * g))
    starts = [start_yield, 0.0, abs(start_yield) + math.sqrt(float(np.sum(g * b))) + 1.0]
    free = fit_signal_and_background(n, b, g, floating_normalisation=floating, signal_starts=starts)
    null = fit_signal_and_background(n, b, g, floating_normalisation=floating, fix_signal=True)
    for result, what in ((free, "signal-plus-background"), (null, "background-only")):
        if not result.valid:
            raise FitDidNotConvergeError(
                f"the {what} fit at m={mass} GeV (width {width} GeV, background "
                f"{background_normalisation}) found no valid minimum from starts {starts}; "
                "check that the background describes the data away from the signal"
            )
    q0 = max(2.0 * (null.nll - free.nll), 0.0) if free.signal > 0 else 0.0
    local_z = math.sqrt(q0)
    total = float(np.sum(b))
    return SignalFitResult(
        mass=float(mass),
        width=float(width),
        signal_yield=free.signal,
        signal_yield_error=free.signal_error,
        background_scale=free.background_total / total,
        background_scale_error=free.background_total_error / total,
        background_normalisation=background_normalisation,
        nll_signal_plus_background=free.nll,
        nll_background_only=null.nll,
        q0=q0,
        local_z=local_z,
        local_p=float(ndtr(-local_z)),
        signal_fraction_in_range=fraction_in_range,
        n_bins_fitted=int(n.size),
    )


def format_p(p: float, upper_limit: bool = False) -> str:
    """A p-value for a sentence: "< 5.4e-06" when it is an upper limit, else 3 digits."""
    return f"< {p:.2g}" if upper_limit else f"{p:.3g}"
