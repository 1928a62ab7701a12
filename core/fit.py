"""Extended binned Poisson likelihood fits of a background function to a mass spectrum.

The likelihood is that of iminuit's ExtendedBinnedNLL: bin counts n_i are Poisson with
mean mu_i = integral of f over bin i (PHYSICS.md section 5). Writing mu_i = N P_i(theta)
with P_i the shape's bin fractions over the bins in the fit, the normalisation separates
exactly (N_hat = sum n_i, var N = N, no correlation with theta), so Minuit minimises the
multinomial NLL in the shape parameters theta only, in whitened coordinates: for the
log-linear families (p2..p6, UA2) with the covariance of the weighted least-squares start;
for any other shape (symbolic-regression expressions, strongly non-linear in ~10 constants)
with the expected information of the likelihood itself (`shape_directions`, which also
drops exact redundancies such as a constant term next to p1), after a Levenberg-Marquardt
pre-fit on the deviance residuals, re-whitened at the point reached when Hesse is not
accurate. The least-squares start of such a shape moves only those directions too, so an
exact redundancy stays where the start put it at every step. ln p1 and its covariance
follow from N_hat and the integral of the shape.

The bins a fit sees (the fit range, an excluded window) are chosen by `core.fitrange`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from iminuit import Minuit
from scipy import optimize, special, stats

from core.errors import FitDidNotConvergeError, FitError, InvalidInputError
from core.fitfunctions import (
    BackgroundFunction,
    FloatArray,
    gauss_legendre_nodes,
    get_function,
    nested_start,
)
from core.fitrange import BoolArray, check_counts, fitted_bins

_BAD_NLL = 1e300
_BAD_RESIDUAL = 1e15
_EXACT_REDUNDANCY = {True: 1e-14, False: 1e-12}
"""Information cut of `shape_directions` for analytic (True) and finite-difference gradients."""
_NONLINEAR_TOLERANCES = (1e-12, 1e-12, 1e-10, 1e-8, 1e-6)
"""Information cut of each round of a non-log-linear fit: raised while Hesse is inaccurate."""


@dataclass(frozen=True, eq=False)
class SpectrumFitProblem:
    """A validated histogram restricted to its fit range, ready for repeated fits.

    Bins `first_bin` .. `stop_bin - 1` form the fit range; `used` marks the bins of the range
    that enter the likelihood (False inside an excluded window). Masses in GeV.
    """

    edges: FloatArray
    counts: FloatArray
    first_bin: int
    stop_bin: int
    used: BoolArray
    sqrt_s: float
    nodes: FloatArray
    weights: FloatArray
    excluded_window: tuple[float, float] | None = None

    @property
    def fit_range(self) -> tuple[float, float]:
        """Lower and upper edge (GeV) of the fit range."""
        return float(self.edges[self.first_bin]), float(self.edges[self.stop_bin])

    @property
    def range_edges(self) -> FloatArray:
        """Bin edges (GeV) of the fit range."""
        return self.edges[self.first_bin : self.stop_bin + 1]

    @property
    def range_counts(self) -> FloatArray:
        """Counts of the bins in the fit range."""
        return self.counts[self.first_bin : self.stop_bin]

    @property
    def n_used(self) -> int:
        """Number of bins that enter the likelihood."""
        return int(np.count_nonzero(self.used))

    def with_range_counts(self, range_counts: npt.ArrayLike) -> SpectrumFitProblem:
        """The same problem with new counts in the fit range (for pseudo-experiments)."""
        values = np.asarray(range_counts, dtype=np.float64)
        expected_shape = (self.stop_bin - self.first_bin,)
        if values.shape != expected_shape:
            raise InvalidInputError(
                f"expected {expected_shape[0]} counts for the fit range, got shape {values.shape}"
            )
        check_counts(values)
        if not np.any(values[self.used] > 0):
            raise InvalidInputError(
                "all counts in the fit range are zero; a pseudo-experiment needs events"
            )
        counts = self.counts.copy()
        counts[self.first_bin : self.stop_bin] = values
        return replace(self, counts=counts)


def prepare_spectrum(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None = None,
    *,
    sqrt_s: float = 13000.0,
    exclude: tuple[float, float] | None = None,
    n_points: int = 6,
) -> SpectrumFitProblem:
    """Validate a histogram and select its fit range [lo, hi] GeV, ready for repeated fits.

    The bins are those of `core.fitrange.fitted_bins`: hi None (or no range) means the
    fixed upper mass (0.65 sqrt_s, empty bins included), no range starts at the first edge,
    events above the range are not fitted, and bins overlapping the `exclude` window
    [lo, hi] GeV are left out of the likelihood.
    """
    bins = fitted_bins(edges, counts, fit_range, sqrt_s=sqrt_s, exclude=exclude)
    nodes, weights = gauss_legendre_nodes(bins.range_edges, sqrt_s, n_points)
    return SpectrumFitProblem(
        edges=bins.edges,
        counts=bins.counts,
        first_bin=bins.first_bin,
        stop_bin=bins.stop_bin,
        used=bins.used,
        sqrt_s=float(sqrt_s),
        nodes=nodes,
        weights=weights,
        excluded_window=None if exclude is None else (float(exclude[0]), float(exclude[1])),
    )


def log_sum_exp(values: FloatArray, axis: int | None = None) -> FloatArray:
    """Compute ln sum exp(values) along `axis` without overflow (a lean scipy logsumexp)."""
    with np.errstate(all="ignore"):
        peak = np.max(values, axis=axis, keepdims=True)
        peak = np.where(np.isfinite(peak), peak, 0.0)
        total = np.log(np.sum(np.exp(values - peak), axis=axis, keepdims=True)) + peak
    return np.asarray(np.squeeze(total, axis=axis), dtype=np.float64)


class BinnedShape:
    """ln of the integral of the shape g(x; theta) over each bin of a fit range (GeV).

    The log-linear families get exact gradients; other shapes use finite differences.
    """

    def __init__(self, problem: SpectrumFitProblem, function: BackgroundFunction) -> None:
        self.problem = problem
        self.function = function
        self._middle = problem.weights.shape[1] // 2
        self.features = function.log_features(problem.nodes) if function.is_log_linear else None

    @property
    def n_shape(self) -> int:
        """Number of shape parameters theta."""
        return self.function.n_params - 1

    def _log_g(self, theta: FloatArray) -> FloatArray:
        if self.features is not None:
            return self.features @ theta
        with np.errstate(all="ignore"):
            return self.function.log_shape(self.problem.nodes, theta)

    def log_integrals(self, theta: FloatArray) -> FloatArray:
        """Log of the integral of g over every bin of the fit range (GeV).

        Exponents are taken relative to the middle node of each bin, where g varies little;
        non-finite values flag parameters far outside the physical region.
        """
        log_g = self._log_g(theta)
        reference = log_g[:, self._middle]
        with np.errstate(all="ignore"):
            sums = np.einsum("ij,ij->i", self.problem.weights, np.exp(log_g - reference[:, None]))
            return np.asarray(reference + np.log(sums), dtype=np.float64)

    def log_integrals_and_gradient(self, theta: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Log bin integrals and their derivatives by theta, shape (n_bins, n_shape)."""
        if self.features is None:
            values = self.log_integrals(theta)
            gradient = np.empty((values.size, self.n_shape))
            for k in range(self.n_shape):
                step = 1e-6 * max(1.0, abs(float(theta[k])))
                up, down = theta.copy(), theta.copy()
                up[k] += step
                down[k] -= step
                with np.errstate(all="ignore"):
                    gradient[:, k] = (self.log_integrals(up) - self.log_integrals(down)) / (
                        2 * step
                    )
            return values, gradient
        log_g = self.features @ theta
        reference = log_g[:, self._middle]
        with np.errstate(all="ignore"):
            node_terms = self.problem.weights * np.exp(log_g - reference[:, None])
            sums = node_terms.sum(axis=1)
            values = np.asarray(reference + np.log(sums), dtype=np.float64)
            gradient = np.einsum("ij,ijk->ik", node_terms / sums[:, None], self.features)
        return values, gradient


class _ProfiledNLL:
    """Multinomial NLL of the shape, the extended NLL with N profiled exactly."""

    def __init__(self, shape: BinnedShape, origin: FloatArray, whitening: FloatArray) -> None:
        problem = shape.problem
        self.shape = shape
        self.origin = origin
        self.whitening = whitening
        self.used = problem.used
        self.counts = problem.range_counts[problem.used]
        self.total = float(self.counts.sum())
        filled = self.counts > 0
        self.log_data_fractions = np.zeros(self.counts.size)
        self.log_data_fractions[filled] = np.log(self.counts[filled] / self.total)

    def theta(self, phi: FloatArray) -> FloatArray:
        """Shape parameters at whitened point `phi`; inf far out, where the NLL is bad."""
        with np.errstate(over="ignore", invalid="ignore"):
            return self.origin + self.whitening @ phi

    def __call__(self, phi: FloatArray) -> float:
        """Half the multinomial deviance, sum n_i ln(n_i / (N P_i)): small for good fits.

        Equal to the profiled NLL up to a constant; summed bin by bin so that Minuit's
        precision, relative to the value, holds for millions of events.
        """
        log_integrals = self.shape.log_integrals(self.theta(np.asarray(phi)))[self.used]
        with np.errstate(all="ignore"):
            log_fractions = log_integrals - float(log_sum_exp(log_integrals))
            value = float(np.dot(self.counts, self.log_data_fractions - log_fractions))
        return value if np.isfinite(value) else _BAD_NLL

    def residuals(self, phi: FloatArray) -> FloatArray:
        """Signed square roots of the per-bin deviance with N profiled; sum of squares = D."""
        log_integrals = self.shape.log_integrals(self.theta(np.asarray(phi)))[self.used]
        with np.errstate(all="ignore"):
            log_expected = np.log(self.total) + log_integrals - float(log_sum_exp(log_integrals))
            expected = np.exp(log_expected)
            terms = (
                expected
                - self.counts
                + self.counts * (self.log_data_fractions + np.log(self.total) - log_expected)
            )
            result = np.sign(self.counts - expected) * np.sqrt(2 * np.clip(terms, 0.0, None))
        if not np.all(np.isfinite(result)):
            return np.full(self.counts.size, _BAD_RESIDUAL)
        return np.asarray(result, dtype=np.float64)

    def gradient(self, phi: FloatArray) -> FloatArray:
        log_integrals, gradient = self.shape.log_integrals_and_gradient(self.theta(np.asarray(phi)))
        log_integrals, gradient = log_integrals[self.used], gradient[self.used]
        with np.errstate(all="ignore"):
            fractions = np.exp(log_integrals - float(log_sum_exp(log_integrals)))
            d_theta = -self.counts @ gradient + self.total * (fractions @ gradient)
            result = self.whitening.T @ d_theta
        return np.asarray(np.where(np.isfinite(result), result, 0.0), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class FitResult:
    """A converged background fit: parameters (ln p1, p2, ...), covariance and fit quality.

    `nll` is the full extended Poisson -ln L over the bins in the likelihood; `deviance` is
    the Baker-Cousins likelihood chi2, 2 sum(mu - n + n ln(n/mu)); `chi2` is Pearson's
    sum (n - mu)^2 / mu; `p_value` is the asymptotic chi2 probability of the deviance
    with `ndf` = bins in the likelihood - free parameters (all parameters but exact
    redundancies, see `shape_directions`). `expected` holds mu for every bin of
    the fit range (GeV bins `fit_range`), excluded-window bins included.
    """

    function: BackgroundFunction
    parameters: tuple[float, ...]
    errors: tuple[float, ...]
    covariance: FloatArray
    nll: float
    chi2: float
    deviance: float
    ndf: int
    p_value: float
    valid: bool
    accurate_covariance: bool
    expected: FloatArray
    first_bin: int
    stop_bin: int
    fit_range: tuple[float, float]
    used: BoolArray
    sqrt_s: float
    edm: float
    n_calls: int
    start: str
    notes: tuple[str, ...] = field(default=())

    @property
    def name(self) -> str:
        """Name of the fitted function."""
        return self.function.name

    @property
    def theta(self) -> FloatArray:
        """Shape parameters (all but ln p1)."""
        return np.asarray(self.parameters[1:], dtype=np.float64)

    @property
    def n_used(self) -> int:
        """Number of bins in the likelihood."""
        return int(np.count_nonzero(self.used))

    @property
    def n_free(self) -> int:
        """Parameters the data determine, ln p1 included: n_used - ndf (<= n_params)."""
        return self.n_used - self.ndf


def fit_quality(
    counts: FloatArray, expected: FloatArray, n_params: int
) -> tuple[float, float, float, int, float]:
    """(nll, Pearson chi2, deviance, ndf, deviance p-value) of counts against expected."""
    ndf = counts.size - n_params
    nll = float(np.sum(expected - special.xlogy(counts, expected) + special.gammaln(counts + 1)))
    # a bin whose expectation underflows to 0 adds nothing when empty and infinity otherwise
    pearson = np.divide(
        (counts - expected) ** 2,
        expected,
        out=np.where(counts > 0, np.inf, 0.0),
        where=expected > 0,
    )
    chi2 = float(np.sum(pearson))
    deviance = float(
        2
        * np.sum(
            expected - counts + special.xlogy(counts, counts) - special.xlogy(counts, expected)
        )
    )
    deviance = max(deviance, 0.0)
    p_value = float(stats.chi2.sf(deviance, ndf)) if ndf > 0 else float("nan")
    return nll, chi2, deviance, ndf, p_value


def _least_squares_start(
    problem: SpectrumFitProblem,
    function: BackgroundFunction,
    initial: FloatArray | None = None,
) -> tuple[FloatArray, FloatArray] | None:
    """Weighted least squares of ln(n / width) at bin centres: (theta, covariance) or None.

    Exact linear algebra for log-linear functions; otherwise Levenberg-Marquardt from
    `initial` (or the function's defaults) along the directions the data determine there
    (`shape_directions`: exact redundancies stay at their start), with the Gauss-Newton
    covariance (zero along the redundancies).
    """
    range_edges = problem.range_edges
    lower = range_edges[:-1]
    upper = np.minimum(range_edges[1:], problem.sqrt_s)
    counts = problem.range_counts
    filled = problem.used & (counts > 0)
    if np.count_nonzero(filled) < function.n_params + 1:
        return None
    x_centre = ((lower + upper) / 2)[filled] / problem.sqrt_s
    target = np.log(counts[filled] / (upper - lower)[filled])
    sqrt_weights = np.sqrt(counts[filled])
    if function.is_log_linear:
        design = np.column_stack([np.ones(x_centre.size), function.log_features(x_centre)])
        weighted = design * sqrt_weights[:, None]
        solution, _, rank, _ = np.linalg.lstsq(weighted, target * sqrt_weights, rcond=None)
        if rank < function.n_params:
            return None
        _, singular, right = np.linalg.svd(weighted, full_matrices=False)
        covariance = (right.T / singular**2) @ right
        return solution[1:], covariance[1:, 1:]
    start = np.asarray(function.start if initial is None else initial, dtype=np.float64)
    # Levenberg-Marquardt in (offset, psi), theta = start + directions psi: only the shape
    # directions the data determine move, so an exact redundancy with the offset (a constant
    # term of ln g, a global factor times coefficients) stays at its start. Unrestricted, LM
    # walked along it: the P4 expression's c0 went from 0 to 4482 with the offset at -4487
    # (finite-difference Jacobian, relative singular value 5e-11, above the 1e-12 cut below),
    # an equal fit whose exp(ln p1) underflows. Without finite information at the start,
    # nothing tells a redundancy apart, and every parameter moves.
    try:
        directions = shape_directions(BinnedShape(problem, function), start)
    except FitError:
        directions = np.eye(start.size)
    if directions.shape[1] == 0:
        return None

    def residuals(beta: FloatArray) -> FloatArray:
        with np.errstate(all="ignore"):
            theta = start + directions @ beta[1:]
            values = (target - beta[0] - function.log_shape(x_centre, theta)) * sqrt_weights
        return np.asarray(np.where(np.isfinite(values), values, _BAD_RESIDUAL), dtype=np.float64)

    with np.errstate(all="ignore"):
        offset = float(np.mean(target - function.log_shape(x_centre, start)))
    beta = np.concatenate([[offset], np.zeros(directions.shape[1])])
    if not (np.isfinite(offset) and np.all(np.abs(residuals(beta)) < _BAD_RESIDUAL)):
        return None
    solution = optimize.least_squares(residuals, beta, method="lm")
    if np.all(np.isfinite(solution.x)) and np.all(np.isfinite(solution.jac)):
        beta, jacobian = solution.x, solution.jac
    else:
        jacobian = optimize.approx_fprime(beta, residuals)
    _, singular, right = np.linalg.svd(jacobian, full_matrices=False)
    if not (np.all(np.isfinite(singular)) and singular.min() > 1e-12 * singular.max()):
        return None
    covariance = (right.T / singular**2) @ right
    theta = start + directions @ beta[1:]
    # no variance along the redundancies left out (only the log-linear path whitens with it)
    return theta, directions @ covariance[1:, 1:] @ directions.T


def _whitening(covariance: FloatArray | None, theta: FloatArray) -> FloatArray:
    if covariance is not None:
        try:
            return np.asarray(np.linalg.cholesky(covariance), dtype=np.float64)
        except np.linalg.LinAlgError:
            pass
    return np.diag(np.maximum(0.1 * np.abs(theta), 0.1))


def shape_directions(
    shape: BinnedShape,
    theta: npt.ArrayLike,
    *,
    tolerance: float | None = None,
    max_directions: int | None = None,
) -> FloatArray:
    """Whitened directions T (n_shape, k) of the shape parameters that the data determine.

    T^T I T = 1 with I the expected information of the profiled (multinomial) likelihood at
    `theta`, so theta + T phi has unit errors in phi. Information is measured relative to
    each parameter's own Poisson scale (the information it would carry with a free
    normalisation); eigen-directions below `tolerance` (default: the numerical floor, 1e-14
    with analytic and 1e-12 with finite-difference gradients) are exact redundancies, such
    as a constant term of ln g next to p1 or a global factor times coefficients, and are
    left out (k < n_shape); `max_directions` keeps only the best-determined ones. Raises
    FitError when the bin integrals or their derivatives are not finite at `theta`.
    """
    theta_values = np.asarray(theta, dtype=np.float64)
    used = shape.problem.used
    log_integrals, gradient = shape.log_integrals_and_gradient(theta_values)
    log_integrals, gradient = log_integrals[used], gradient[used]
    if not (np.all(np.isfinite(log_integrals)) and np.all(np.isfinite(gradient))):
        raise FitError(
            f"{shape.function.name}: the bin integrals or their derivatives are not finite at "
            f"{theta_values.tolist()}; start closer to the data"
        )
    cut = _EXACT_REDUNDANCY[shape.features is not None] if tolerance is None else tolerance
    total = float(shape.problem.range_counts[used].sum())
    fractions = np.exp(log_integrals - float(log_sum_exp(log_integrals)))
    scale = np.sqrt(total * (fractions @ gradient**2))
    centred = gradient - fractions @ gradient
    information = total * centred.T @ (centred * fractions[:, None])
    usable = scale > 0
    if not np.any(usable):
        return np.zeros((shape.n_shape, 0))
    correlation = information[np.ix_(usable, usable)] / np.outer(scale[usable], scale[usable])
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    keep = np.flatnonzero(eigenvalues > cut)[::-1][:max_directions]
    directions = np.zeros((shape.n_shape, keep.size))
    directions[usable] = eigenvectors[:, keep] / np.sqrt(eigenvalues[keep]) / scale[usable, None]
    return directions


@dataclass(frozen=True)
class _Attempt:
    label: str
    theta: FloatArray
    covariance: FloatArray
    nll: float
    valid: bool
    accurate: bool
    edm: float
    n_calls: int
    n_directions: int
    reason: str


def _minimise(
    shape: BinnedShape,
    origin: FloatArray,
    whitening: FloatArray,
    label: str,
    strategy: int,
    *,
    prefit: bool = False,
) -> _Attempt:
    """Migrad and Hesse on the profiled NLL in phi, theta = origin + whitening phi.

    `whitening` may have fewer columns than shape parameters (redundant directions left
    out); `prefit` runs Levenberg-Marquardt on the deviance residuals first, and Minuit then
    starts there with unit steps (the coordinates are whitened by the information).
    """
    objective = _ProfiledNLL(shape, origin, whitening)
    n_directions = whitening.shape[1]
    start = np.zeros(n_directions)
    if prefit:
        solution = optimize.least_squares(
            objective.residuals, start, method="lm", max_nfev=100 * (n_directions + 1)
        )
        if np.all(np.isfinite(solution.x)) and objective(solution.x) < objective(start):
            start = np.asarray(solution.x, dtype=np.float64)
    grad = objective.gradient if shape.features is not None else None
    minuit = Minuit(objective, start, grad=grad)
    minuit.errordef = Minuit.LIKELIHOOD
    minuit.strategy = strategy
    if prefit:
        minuit.errors = np.ones(n_directions)
    minuit.migrad(ncall=20_000 if prefit else None)
    if minuit.fmin is not None and minuit.fmin.is_valid:
        minuit.hesse()
    fmin = minuit.fmin
    assert fmin is not None
    phi = np.asarray(minuit.values, dtype=np.float64)
    theta = objective.theta(phi)
    covariance = (
        whitening @ np.asarray(minuit.covariance, dtype=np.float64) @ whitening.T
        if minuit.covariance is not None
        else np.full((shape.n_shape, shape.n_shape), np.nan)
    )
    finite = bool(np.all(np.isfinite(theta)) and np.all(np.isfinite(covariance)))
    accurate = bool(fmin.has_accurate_covar and not fmin.hesse_failed and finite)
    reasons = [
        text
        for text, flag in (
            ("EDM above maximum", fmin.is_above_max_edm),
            ("call limit reached", fmin.has_reached_call_limit),
            ("Hesse failed", fmin.hesse_failed),
            ("covariance not accurate", not fmin.has_accurate_covar),
            ("covariance forced positive-definite", fmin.has_made_posdef_covar),
            ("non-finite parameters or covariance", not finite),
            ("likelihood not finite near the minimum", fmin.fval >= _BAD_NLL),
        )
        if flag
    ]
    valid = bool(fmin.is_valid and finite and fmin.fval < _BAD_NLL)
    return _Attempt(
        label=f"{label} (strategy {strategy})",
        theta=theta,
        covariance=covariance,
        nll=float(fmin.fval),
        valid=valid,
        accurate=accurate,
        edm=float(fmin.edm),
        n_calls=int(fmin.nfcn),
        n_directions=n_directions,
        reason="; ".join(reasons) or "valid",
    )


def _failed_attempt(shape: BinnedShape, origin: FloatArray, label: str, reason: str) -> _Attempt:
    n_shape = shape.n_shape
    return _Attempt(
        label=label,
        theta=origin,
        covariance=np.full((n_shape, n_shape), np.nan),
        nll=_BAD_NLL,
        valid=False,
        accurate=False,
        edm=np.inf,
        n_calls=0,
        n_directions=0,
        reason=reason,
    )


def _descend(
    shape: BinnedShape, origin: FloatArray, covariance: FloatArray | None, label: str
) -> list[_Attempt]:
    """Minimise from `origin`; the last attempt is the outcome, the others are the trail.

    Log-linear families: whitened by the least-squares covariance, Migrad at strategy 1,
    then re-whitened with Minuit's own covariance or strategy 2 when Hesse is inaccurate.
    Other shapes: whitened by the information at the best point so far (redundancies left
    out), LM pre-fit, Migrad at strategy 2 and Hesse, in up to five rounds; from the third
    on, directions with ever more information (`_NONLINEAR_TOLERANCES`) are held at the
    values reached: the sloppy directions of a many-constant expression, where its
    non-linearity dominates the curvature and Hesse can not measure it.
    """
    if shape.features is not None:
        attempts: list[_Attempt] = []
        whitening = _whitening(covariance, origin)
        attempt = _minimise(shape, origin, whitening, label, strategy=1)
        if attempt.valid and not attempt.accurate and np.all(np.isfinite(attempt.covariance)):
            attempts.append(attempt)
            rescaled = _whitening(attempt.covariance, attempt.theta)
            attempt = _minimise(shape, attempt.theta, rescaled, f"{label}, rescaled", strategy=2)
        if not (attempt.valid and attempt.accurate):
            attempts.append(attempt)
            attempt = _minimise(shape, origin, whitening, label, strategy=2)
        return [*attempts, attempt]
    attempts = []
    point, point_nll = origin, _BAD_NLL
    for round_index, tolerance in enumerate(_NONLINEAR_TOLERANCES):
        round_label = label if round_index == 0 else f"{label}, re-whitened {round_index}"
        try:
            directions = shape_directions(shape, point, tolerance=tolerance)
        except FitError as error:
            attempts.append(_failed_attempt(shape, point, round_label, str(error)))
            break
        if directions.shape[1] == 0:
            attempts.append(
                _failed_attempt(shape, point, round_label, "no parameter changes the shape")
            )
            break
        attempt = _minimise(shape, point, directions, round_label, strategy=2, prefit=True)
        attempts.append(attempt)
        if attempt.valid and attempt.accurate:
            break
        if np.all(np.isfinite(attempt.theta)) and attempt.nll < point_nll:
            point, point_nll = attempt.theta, attempt.nll
    return attempts


def _full_result(
    problem: SpectrumFitProblem,
    shape: BinnedShape,
    attempt: _Attempt,
    notes: tuple[str, ...],
) -> FitResult:
    function = shape.function
    theta = attempt.theta
    log_integrals, gradient = shape.log_integrals_and_gradient(theta)
    used = problem.used
    total = float(problem.range_counts[used].sum())
    log_norm = float(log_sum_exp(log_integrals[used]))
    fractions = np.exp(log_integrals[used] - log_norm)
    d_log_norm = fractions @ gradient[used]
    log_p1 = float(np.log(total) - log_norm)
    if not np.isfinite(log_p1):
        raise FitError(
            f"{function.name}: the normalisation ln p1 = {log_p1} is not finite; the shape "
            "integral over the fit range vanishes or diverges"
        )
    n_params = function.n_params
    covariance = np.zeros((n_params, n_params))
    covariance[1:, 1:] = attempt.covariance
    shape_part = attempt.covariance @ d_log_norm
    covariance[0, 0] = 1.0 / total + float(d_log_norm @ shape_part)
    covariance[0, 1:] = covariance[1:, 0] = -shape_part
    expected = np.exp(log_p1 + log_integrals)
    n_free = 1 + attempt.n_directions
    if n_free < n_params:
        notes = (
            *notes,
            f"{n_params - n_free} combination(s) of the shape parameters are not determined "
            "by the data (exact redundancies, or too sloppy for Hesse to measure); they stay "
            f"where the fit started its last round and ndf counts {n_free} free parameters",
        )
    nll, chi2, deviance, ndf, p_value = fit_quality(
        problem.range_counts[used], expected[used], n_free
    )
    parameters = (log_p1, *(float(value) for value in theta))
    errors = tuple(float(np.sqrt(max(value, 0.0))) for value in np.diag(covariance))
    return FitResult(
        function=function,
        parameters=parameters,
        errors=errors,
        covariance=covariance,
        nll=nll,
        chi2=chi2,
        deviance=deviance,
        ndf=ndf,
        p_value=p_value,
        valid=attempt.valid,
        accurate_covariance=attempt.accurate,
        expected=expected,
        first_bin=problem.first_bin,
        stop_bin=problem.stop_bin,
        fit_range=problem.fit_range,
        used=used.copy(),
        sqrt_s=problem.sqrt_s,
        edm=attempt.edm,
        n_calls=attempt.n_calls,
        start=attempt.label,
        notes=notes,
    )


def fit_spectrum(
    problem: SpectrumFitProblem,
    function: BackgroundFunction | str,
    *,
    starts: Sequence[Sequence[float]] | None = None,
    lower: FitResult | None = None,
    seed: int | np.random.Generator = 0,
    max_attempts: int = 6,
) -> FitResult:
    """Fit `function` to a prepared spectrum by the extended binned Poisson likelihood.

    Starts, in order: `starts` (full parameter vectors, ln p1 ignored because the
    normalisation is profiled), the embedding of the `lower` fitted function, the weighted
    least-squares fit of ln(n / width), the function's defaults; the best valid minimum
    among them is kept, and random restarts follow while none is valid. Any `shape`
    function works, symbolic expressions included (see the module docstring). Raises
    FitDidNotConvergeError when no start gives a valid minimum with an accurate covariance.
    """
    background = get_function(function) if isinstance(function, str) else function
    n_params = background.n_params
    if problem.n_used <= n_params:
        raise InvalidInputError(
            f"{background.name} has {n_params} parameters but the fit uses only "
            f"{problem.n_used} bins; need more bins than parameters (widen the fit range)"
        )
    if max_attempts < 1:
        raise InvalidInputError(f"max_attempts must be at least 1, got {max_attempts}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    shape = BinnedShape(problem, background)
    candidates, covariance = _start_candidates(problem, background, starts, lower)
    attempts: list[_Attempt] = []
    best: _Attempt | None = None
    for label, origin in candidates:
        if best is not None and label == "defaults":
            break
        trail = _descend(shape, origin, covariance, label)
        attempts.extend(trail)
        attempt = trail[-1]
        if attempt.valid and attempt.accurate and (best is None or attempt.nll < best.nll):
            best = attempt
    if best is None:
        best = _random_restarts(shape, covariance, attempts, rng, max_attempts)
    if best is None:
        trail_text = "; ".join(f"{item.label}: {item.reason}" for item in attempts)
        raise FitDidNotConvergeError(
            f"{background.name} did not converge on the fit range {problem.fit_range} GeV "
            f"after {len(attempts)} attempts ({trail_text}); try another function, a "
            "different fit range or explicit start values"
        )
    notes = tuple(f"{item.label}: {item.reason}" for item in attempts if item is not best)
    return _full_result(problem, shape, best, notes)


def _start_candidates(
    problem: SpectrumFitProblem,
    function: BackgroundFunction,
    starts: Sequence[Sequence[float]] | None,
    lower: FitResult | None,
) -> tuple[list[tuple[str, FloatArray]], FloatArray | None]:
    """The labelled shape starts of `fit_spectrum` in order, and the least-squares covariance.

    User starts, the embedding of the `lower` fit, the weighted least squares (from the
    first start when there is one), the function's defaults last.
    """
    n_params = function.n_params
    candidates: list[tuple[str, FloatArray]] = []
    for index, start in enumerate(starts or ()):
        values = np.asarray(start, dtype=np.float64)
        if values.shape != (n_params,) or not np.all(np.isfinite(values)):
            raise InvalidInputError(
                f"start {index} for {function.name} must be {n_params} finite values "
                f"{function.parameter_names}, got {list(values)}"
            )
        candidates.append((f"user start {index}", values[1:]))
    if lower is not None:
        embedded = nested_start(lower.function, lower.theta, function)
        if embedded is not None:
            candidates.append((f"from {lower.name}", embedded))
    least_squares = _least_squares_start(
        problem, function, candidates[0][1] if candidates else None
    )
    covariance = None
    if least_squares is not None:
        candidates.append(("least squares", least_squares[0]))
        covariance = least_squares[1]
    candidates.append(("defaults", np.asarray(function.start, dtype=np.float64)))
    return candidates, covariance


def _random_restarts(
    shape: BinnedShape,
    covariance: FloatArray | None,
    attempts: list[_Attempt],
    rng: np.random.Generator,
    max_attempts: int,
) -> _Attempt | None:
    """Restart at random around the best point of `attempts` until a minimum is valid.

    Up to `max_attempts` restarts, each appended to `attempts`; the valid one, or None.
    """
    retries = 0
    while retries < max_attempts:
        retries += 1
        centre = min(attempts, key=lambda item: item.nll).theta
        label = f"random restart {retries}"
        if shape.features is not None:
            whitening = _whitening(covariance, centre)
            origin = centre + whitening @ rng.normal(scale=2.0, size=shape.n_shape)
            attempt = _minimise(shape, origin, whitening, label, strategy=2)
            attempts.append(attempt)
        else:
            try:
                directions = shape_directions(shape, centre)
            except FitError as error:
                attempts.append(_failed_attempt(shape, centre, label, str(error)))
                return None
            origin = centre + directions @ rng.normal(scale=2.0, size=directions.shape[1])
            trail = _descend(shape, origin, None, label)
            attempts.extend(trail)
            attempt = trail[-1]
        if attempt.valid and attempt.accurate:
            return attempt
    return None


def fit_background(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    function: BackgroundFunction | str,
    fit_range: tuple[float, float | None] | None = None,
    *,
    sqrt_s: float = 13000.0,
    starts: Sequence[Sequence[float]] | None = None,
    lower: FitResult | None = None,
    exclude: tuple[float, float] | None = None,
    seed: int | np.random.Generator = 0,
    max_attempts: int = 6,
) -> FitResult:
    """Fit a background function to a mass spectrum (edges in GeV) over [lo, hi] GeV.

    See `prepare_spectrum` for the fit range and `fit_spectrum` for the fit itself.
    """
    problem = prepare_spectrum(edges, counts, fit_range, sqrt_s=sqrt_s, exclude=exclude)
    return fit_spectrum(
        problem, function, starts=starts, lower=lower, seed=seed, max_attempts=max_attempts
    )


def background_jacobian(
    result: FitResult, edges: npt.ArrayLike, *, n_points: int = 6
) -> FloatArray:
    """Derivatives d mu_i / d parameters (ln p1, theta) of the fitted counts, bins x parameters.

    Rows cover the fit range (bins `result.first_bin` .. `result.stop_bin - 1`, masked bins
    included: there the extrapolated function). mu_i = exp(ln p1 + L_i(theta)) with L_i the
    log of the shape's integral over bin i, so row i is mu_i (1, dL_i/dtheta). The
    derivatives are exact for the log-linear families and central finite differences for any
    other shape (symbolic expressions), as in the fit itself (`BinnedShape`). Together with
    `result.covariance` it gives the covariance of the expected counts, J C J^T, and the
    linearised refit of pseudo-data. Rows where mu underflows to zero are zero. Raises
    InvalidInputError when the edges do not match the fit range, FitError when the counts
    or their derivatives are not finite.
    """
    edge_values = _fitted_edges(result, edges)
    first, stop = result.first_bin, result.stop_bin
    nodes, weights = gauss_legendre_nodes(edge_values[first : stop + 1], result.sqrt_s, n_points)
    problem = SpectrumFitProblem(
        edges=edge_values,
        counts=np.zeros(edge_values.size - 1),
        first_bin=first,
        stop_bin=stop,
        used=np.asarray(result.used, dtype=bool),
        sqrt_s=result.sqrt_s,
        nodes=nodes,
        weights=weights,
    )
    log_integrals, gradient = BinnedShape(problem, result.function).log_integrals_and_gradient(
        result.theta
    )
    with np.errstate(over="ignore", under="ignore"):
        expected = np.exp(result.parameters[0] + log_integrals)
    alive = expected > 0
    if not (np.all(np.isfinite(expected)) and np.all(np.isfinite(gradient[alive]))):
        raise FitError(
            f"{result.name}: the expected counts or their derivatives are not finite "
            "somewhere in the fit range; no uncertainty can be propagated"
        )
    jacobian = np.zeros((expected.size, result.function.n_params))
    jacobian[alive] = expected[alive, None] * np.column_stack(
        [np.ones(alive.sum()), gradient[alive]]
    )
    return jacobian


def expected_errors(result: FitResult, edges: npt.ArrayLike, *, n_points: int = 6) -> FloatArray:
    """1-sigma uncertainty of the fitted expected counts in every bin of the fit range.

    Linear error propagation of the fit covariance C (parameters ln p1, theta):
    sigma_i = sqrt(J_i C J_i^T) with J the `background_jacobian`. The covariance is the
    fit's: Hesse on the profiled shape likelihood, ln p1 from the exact normalisation
    (var N = N), and no variance along exact redundancies (they are not free). Bins of an
    excluded window get the error of the extrapolated function. `edges` (GeV) are the
    histogram's edges that the fit was made on (the bins `result.first_bin` ..
    `result.stop_bin - 1` form the range).

    The error is zero only where mu itself underflows to zero. Raises InvalidInputError
    when the edges do not match the fit range, FitError when the covariance or the
    derivatives are not finite or the propagated variance is clearly negative (a
    covariance that is not positive semi-definite); it never returns NaN.
    """
    covariance = np.asarray(result.covariance, dtype=np.float64)
    n_params = result.function.n_params
    if covariance.shape != (n_params, n_params) or not np.all(np.isfinite(covariance)):
        raise FitError(
            f"{result.name}: the covariance (shape {covariance.shape}) is not a finite "
            f"{n_params}x{n_params} matrix; no uncertainty can be propagated"
        )
    jacobian = background_jacobian(result, edges, n_points=n_points)
    variance = np.einsum("ij,jk,ik->i", jacobian, covariance, jacobian)
    # rounding of a positive semi-definite product: tiny negatives relative to its terms
    magnitude = np.einsum("ij,jk,ik->i", np.abs(jacobian), np.abs(covariance), np.abs(jacobian))
    negative = variance < -1e-10 * magnitude
    if np.any(negative):
        raise FitError(
            f"{result.name}: the propagated variance is negative in {np.count_nonzero(negative)} "
            "bin(s); the covariance is not positive semi-definite"
        )
    errors = np.sqrt(np.clip(variance, 0.0, None))
    if not np.all(np.isfinite(errors)):
        raise FitError(f"{result.name}: the propagated uncertainty is not finite")
    return np.asarray(errors, dtype=np.float64)


def _fitted_edges(result: FitResult, edges: npt.ArrayLike) -> FloatArray:
    """`edges` (GeV) as an array; InvalidInputError unless they are those `result` was fitted on."""
    edge_values = np.asarray(edges, dtype=np.float64)
    first, stop = result.first_bin, result.stop_bin
    if edge_values.ndim != 1 or edge_values.size < stop + 1:
        raise InvalidInputError(
            f"expected_errors needs the histogram's edges (at least {stop + 1}) of the fit over "
            f"bins [{first}, {stop}), got shape {edge_values.shape}"
        )
    range_edges = edge_values[first : stop + 1]
    low, high = result.fit_range
    scale = max(abs(low), abs(high))
    if abs(range_edges[0] - low) > 1e-9 * scale or abs(range_edges[-1] - high) > 1e-9 * scale:
        raise InvalidInputError(
            f"the edges give the range [{range_edges[0]}, {range_edges[-1]}] GeV for bins "
            f"[{first}, {stop}) but the fit was made over {result.fit_range} GeV; pass the "
            "edges of the histogram that was fitted"
        )
    return edge_values
