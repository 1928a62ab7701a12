"""Significances: Z <-> p far in the tails, expected Z of s over b, and a Gaussian signal fit.

Conventions (PHYSICS.md section 6): one-sided p-values, Z = Phi^-1(1 - p) computed as
`-ndtri(p)` (or `-ndtri_exp(ln p)` from a log p-value) so that Z = 8 (p ~ 6e-16) and far
beyond keep full relative precision; p = 1 - Phi(Z) is computed as `ndtr(-Z)`.

The signal fit is a binned extended Poisson likelihood of s g_i + mu_b b_i, with g_i the
fraction of a Gaussian (mass m, width sigma, GeV) in bin i and b_i the expected background
count of bin i, given and held in shape (mu_b = 1 fixed, or floating). The local
significance is the likelihood ratio of the discovery test (Cowan, Cranmer, Gross, Vitells,
arXiv:1007.1727): q0 = 2 (NLL(s = 0) - NLL(s_hat)) for s_hat > 0, else 0; Z = sqrt(q0).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final, Literal

import numpy as np
import numpy.typing as npt
from iminuit import Minuit
from scipy.special import log_ndtr, ndtr, ndtri, ndtri_exp

from core.errors import FitDidNotConvergeError, InvalidInputError

FloatArray = npt.NDArray[np.float64]

BackgroundNormalisation = Literal["fixed", "floating"]
"""Whether the background shape keeps its given normalisation or scales by a free mu_b."""

_SERIES_BELOW: Final = 1e-4
"""Below this s/b the Asimov formula uses its series, free of cancellation."""


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


def mass_resolution(mass_gev: float) -> float:
    """Detector mass resolution sigma(m) = m sqrt(0.84^2/m + 0.016^2) in GeV (the binning's)."""
    if not math.isfinite(mass_gev) or mass_gev <= 0:
        raise InvalidInputError(f"mass_resolution needs a mass > 0 GeV, found {mass_gev}")
    return mass_gev * math.sqrt(0.84**2 / mass_gev + 0.016**2)


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
    """Fraction of a Gaussian (mean `mass`, sigma `width`, GeV) inside each bin of `edges`."""
    e = np.asarray(edges, dtype=np.float64)
    upper = (e - mass) / width
    # Integrate from the side of the nearer tail so that far bins keep relative precision.
    cdf = ndtr(upper)
    sf = ndtr(-upper)
    left = np.diff(cdf)
    right = -np.diff(sf)
    return np.asarray(np.where(e[1:] <= mass, left, right), dtype=np.float64)


def _validate_histogram(
    counts: npt.ArrayLike, background: npt.ArrayLike, edges: npt.ArrayLike
) -> tuple[FloatArray, FloatArray, FloatArray]:
    n = np.asarray(counts, dtype=np.float64)
    b = np.asarray(background, dtype=np.float64)
    e = np.asarray(edges, dtype=np.float64)
    if n.ndim != 1 or b.shape != n.shape or e.shape != (n.size + 1,):
        raise InvalidInputError(
            f"expected 1D counts and background of the same length N and N+1 edges; found "
            f"counts {n.shape}, background {b.shape}, edges {e.shape}"
        )
    if n.size == 0:
        raise InvalidInputError("the histogram is empty; expected at least one bin")
    for name, values in (("counts", n), ("background", b), ("edges", e)):
        if not np.all(np.isfinite(values)):
            raise InvalidInputError(
                f"{name} contain NaN or infinite values at bins "
                f"{np.flatnonzero(~np.isfinite(values))[:10].tolist()}; fix the input histogram"
            )
    if np.any(np.diff(e) <= 0):
        raise InvalidInputError(
            "bin edges must increase strictly (GeV); found a non-increasing step"
        )
    if np.any(n < 0):
        raise InvalidInputError(
            f"counts must be >= 0; negative at bins {np.flatnonzero(n < 0)[:10].tolist()}"
        )
    if np.any(b < 0):
        raise InvalidInputError(
            f"background must be >= 0 expected counts; negative at bins "
            f"{np.flatnonzero(b < 0)[:10].tolist()}; check the background fit"
        )
    empty_background = (b <= 0) & (n > 0)
    if np.any(empty_background):
        raise InvalidInputError(
            "background is zero where data exist, at bins "
            f"{np.flatnonzero(empty_background)[:10].tolist()}; a Poisson model with zero "
            "expectation can not produce these events: extend or fix the background model"
        )
    if not np.any(b > 0):
        raise InvalidInputError("background is zero in every bin; expected a background shape")
    return n, b, e


def _half_deviance(mu: FloatArray, n: FloatArray) -> float:
    """Sum of mu - n + n ln(n / mu): the Poisson NLL up to a constant (Minuit LIKELIHOOD)."""
    if np.any(mu <= 0):
        return 1e30
    with np.errstate(divide="ignore", invalid="ignore"):
        log_term = np.where(n > 0, n * np.log(n / mu), 0.0)
    return float(np.sum(mu - n + log_term))


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
    n_all, b_all, e = _validate_histogram(counts, background, edges)
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

    def nll(signal_yield: float, background_scale: float) -> float:
        return _half_deviance(background_scale * b + signal_yield * g, n)

    nll.errordef = Minuit.LIKELIHOOD  # type: ignore[attr-defined]

    weights = g / b
    start_yield = float(np.sum(weights * (n - b)) / np.sum(weights * g))
    lowest_yield = -0.999 * float(np.min(b[g > 0] / g[g > 0]))
    scale_start = float(np.sum(n) / np.sum(b)) if floating and np.sum(n) > 0 else 1.0

    def minimise(fix_signal: bool) -> Minuit:
        starts = [0.0] if fix_signal else [max(start_yield, 0.5 * lowest_yield), 0.0]
        starts.append(abs(start_yield) + math.sqrt(float(np.sum(g * b))) + 1.0)
        for start in starts:
            minuit = Minuit(nll, signal_yield=start, background_scale=scale_start)
            minuit.limits["signal_yield"] = (lowest_yield, None)
            minuit.limits["background_scale"] = (1e-9, None)
            minuit.fixed["background_scale"] = not floating
            if fix_signal:
                minuit.values["signal_yield"] = 0.0
                minuit.fixed["signal_yield"] = True
                if not floating:
                    return minuit
            minuit.migrad()
            minuit.hesse()
            if minuit.valid and minuit.accurate:
                return minuit
        raise FitDidNotConvergeError(
            f"the signal fit at m={mass} GeV (width {width} GeV, background "
            f"{background_normalisation}) found no valid minimum from starts {starts}; "
            "check that the background describes the data away from the signal"
        )

    free = minimise(fix_signal=False)
    null = minimise(fix_signal=True)
    nll_free = float(nll(*free.values))
    nll_null = float(nll(*null.values))
    signal_yield = float(free.values["signal_yield"])
    q0 = max(2.0 * (nll_null - nll_free), 0.0) if signal_yield > 0 else 0.0
    local_z = math.sqrt(q0)
    return SignalFitResult(
        mass=float(mass),
        width=float(width),
        signal_yield=signal_yield,
        signal_yield_error=float(free.errors["signal_yield"]),
        background_scale=float(free.values["background_scale"]),
        background_scale_error=float(free.errors["background_scale"]) if floating else 0.0,
        background_normalisation=background_normalisation,
        nll_signal_plus_background=nll_free,
        nll_background_only=nll_null,
        q0=q0,
        local_z=local_z,
        local_p=float(ndtr(-local_z)),
        signal_fraction_in_range=fraction_in_range,
        n_bins_fitted=int(n.size),
    )
