"""Smooth background densities of invariant-mass spectra and their bin integrals.

Every function is f(x) = p1 exp(ln g(x; theta)), a density per GeV of m evaluated at
x = m / sqrt_s (PHYSICS.md section 5). The normalisation is carried as ln p1 everywhere
(parameter vectors are (ln p1, p2, ..., pn)): p1 of a good fit can be exp(-3000) when the
shape parameters make g huge in the data range, far beyond double precision. Families
linear in log space (p2..p6, UA2) list the terms of ln g; any other shape (a
symbolic-regression expression) plugs in through a `shape` callable returning ln g.
Expected counts are Gauss-Legendre integrals over each bin, computed in log space so that
no exponent overflows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError

FloatArray = npt.NDArray[np.float64]
LogShape = Callable[[FloatArray, FloatArray], FloatArray]
"""ln g(x, theta): x of any shape, theta the shape parameters; returns an array shaped as x."""


def _term_ln_x(x: FloatArray) -> FloatArray:
    return np.log(x)


def _term_minus_ln_x(x: FloatArray) -> FloatArray:
    return -np.log(x)


def _term_ln_one_minus_x(x: FloatArray) -> FloatArray:
    return np.log1p(-x)


def _term_ln2_x(x: FloatArray) -> FloatArray:
    return np.log(x) ** 2


def _term_ln3_x(x: FloatArray) -> FloatArray:
    return np.log(x) ** 3


def _term_ln4_x(x: FloatArray) -> FloatArray:
    return np.log(x) ** 4


def _term_minus_x(x: FloatArray) -> FloatArray:
    return -x


def _term_minus_x2(x: FloatArray) -> FloatArray:
    return -(x**2)


def _term_minus_x3(x: FloatArray) -> FloatArray:
    return -(x**3)


LOG_TERMS: Final[dict[str, Callable[[FloatArray], FloatArray]]] = {
    "ln(1-x)": _term_ln_one_minus_x,
    "ln x": _term_ln_x,
    "ln^2 x": _term_ln2_x,
    "ln^3 x": _term_ln3_x,
    "ln^4 x": _term_ln4_x,
    "-ln x": _term_minus_ln_x,
    "-x": _term_minus_x,
    "-x^2": _term_minus_x2,
    "-x^3": _term_minus_x3,
}
"""Terms of ln g for log-linear families: ln f = ln p1 + sum_k theta_k term_k(x)."""


@dataclass(frozen=True)
class BackgroundFunction:
    """A background density per GeV, f(x) = p1 exp(ln g(x; theta)) with x = m / sqrt_s.

    Give either `terms` (ln g is linear in theta: sum_k theta_k LOG_TERMS[term_k](x)) or
    a `shape` callable returning ln g(x, theta). `start` holds default shape parameters
    (theta, without p1); `parameter_names` are the physics names, "p1" first, while
    parameter vectors hold ln p1 in its place (`vector_names`). `expression` is set for
    shapes given as text (symbolic regression): ln g in x, lnx, ln1mx whose named
    constants are the shape parameters, in order.
    """

    name: str
    parameter_names: tuple[str, ...]
    formula: str
    start: tuple[float, ...]
    terms: tuple[str, ...] = ()
    shape: LogShape | None = None
    expression: str | None = None

    def __post_init__(self) -> None:
        n_shape = len(self.parameter_names) - 1
        if n_shape < 1:
            raise InvalidInputError(
                f"background function {self.name!r} needs p1 and at least one shape "
                f"parameter; got parameter names {self.parameter_names}"
            )
        if (self.shape is None) == (not self.terms):
            raise InvalidInputError(
                f"background function {self.name!r}: give either log-linear `terms` or a "
                "`shape` callable, exactly one of them"
            )
        if self.terms and len(self.terms) != n_shape:
            raise InvalidInputError(
                f"background function {self.name!r} has {n_shape} shape parameters but "
                f"{len(self.terms)} terms {self.terms}; they must match one to one"
            )
        unknown = [term for term in self.terms if term not in LOG_TERMS]
        if unknown:
            raise InvalidInputError(
                f"background function {self.name!r} uses unknown terms {unknown}; "
                f"known terms are {sorted(LOG_TERMS)}"
            )
        if len(self.start) != n_shape:
            raise InvalidInputError(
                f"background function {self.name!r} has {n_shape} shape parameters but "
                f"{len(self.start)} start values"
            )

    @property
    def n_params(self) -> int:
        """Number of free parameters, the normalisation p1 included."""
        return len(self.parameter_names)

    @property
    def vector_names(self) -> tuple[str, ...]:
        """Names of the entries of a parameter vector: "ln p1", then the shape parameters."""
        return (f"ln {self.parameter_names[0]}", *self.parameter_names[1:])

    @property
    def is_log_linear(self) -> bool:
        """True when ln g is linear in the shape parameters (fast, analytic gradients)."""
        return bool(self.terms)

    def log_features(self, x: FloatArray) -> FloatArray:
        """Terms of ln g at x, shape x.shape + (n_params - 1,); log-linear families only."""
        if not self.terms:
            raise InvalidInputError(
                f"background function {self.name!r} is not log-linear; it has no terms"
            )
        return np.stack([LOG_TERMS[term](x) for term in self.terms], axis=-1)

    def log_shape(self, x: FloatArray, theta: FloatArray) -> FloatArray:
        """Log shape ln g(x; theta), the log density without the normalisation p1."""
        theta = np.asarray(theta, dtype=np.float64)
        if self.shape is not None:
            return np.asarray(self.shape(x, theta), dtype=np.float64)
        result = np.zeros(np.shape(x), dtype=np.float64)
        for term, value in zip(self.terms, theta, strict=True):
            result = result + value * LOG_TERMS[term](x)
        return result

    def log_density(self, x: npt.ArrayLike, parameters: npt.ArrayLike) -> FloatArray:
        """Log density ln f(x), f in GeV^-1, at x = m / sqrt_s in (0, 1); (ln p1, theta)."""
        x_values = _checked_x(x)
        params = np.asarray(parameters, dtype=np.float64)
        if params.shape != (self.n_params,):
            raise InvalidInputError(
                f"{self.name} takes {self.n_params} parameters {self.parameter_names}, "
                f"got an array of shape {params.shape}"
            )
        if not np.all(np.isfinite(params)):
            raise InvalidInputError(f"{self.name} parameters must be finite, got {params}")
        return np.asarray(params[0] + self.log_shape(x_values, params[1:]), dtype=np.float64)

    def density(self, x: npt.ArrayLike, parameters: npt.ArrayLike) -> FloatArray:
        """f(x) per GeV for x = m / sqrt_s in (0, 1)."""
        return np.asarray(np.exp(self.log_density(x, parameters)), dtype=np.float64)


def _checked_x(x: npt.ArrayLike) -> FloatArray:
    values = np.asarray(x, dtype=np.float64)
    if not np.all((values > 0) & (values < 1)):
        bad = values[~((values > 0) & (values < 1))]
        raise InvalidInputError(
            f"x = m / sqrt_s must lie in (0, 1); found {bad.size} values outside, e.g. "
            f"{bad.flat[0]!r}; masses must be positive and below sqrt_s"
        )
    return values


def _power_series_function(order: int) -> BackgroundFunction:
    powers = ("ln x", "ln^2 x", "ln^3 x", "ln^4 x")
    names = tuple(f"p{k}" for k in range(1, order + 1))
    if order == 2:
        return BackgroundFunction(
            name="p2",
            parameter_names=names,
            formula="p1 x^p2",
            start=(-5.0,),
            terms=("ln x",),
        )
    exponent = " + ".join(
        ["p3"] + [f"p{k} " + ("ln x" if k == 4 else f"ln^{k - 3} x") for k in range(4, order + 1)]
    )
    return BackgroundFunction(
        name=f"p{order}",
        parameter_names=names,
        formula=f"p1 (1-x)^p2 x^({exponent})",
        start=(10.0, -5.0) + (0.0,) * (order - 3),
        terms=("ln(1-x)", *powers[: order - 2]),
    )


UA2: Final = BackgroundFunction(
    name="ua2",
    parameter_names=("p1", "p2", "p3", "p4"),
    formula="p1 x^-p2 exp(-p3 x - p4 x^2)",
    start=(5.0, 10.0, 0.0),
    terms=("-ln x", "-x", "-x^2"),
)
"""The UA2-like alternative family used by the robustness checks."""

UA2_5: Final = BackgroundFunction(
    name="ua2_5",
    parameter_names=("p1", "p2", "p3", "p4", "p5"),
    formula="p1 x^-p2 exp(-p3 x - p4 x^2 - p5 x^3)",
    start=(5.0, 10.0, 0.0, 0.0),
    terms=("-ln x", "-x", "-x^2", "-x^3"),
)
"""UA2 with a cubic term, the alternative for spectra with high statistics."""

NESTED_FAMILY: Final = ("p2", "p3", "p4", "p5", "p6")
"""The nested power-law family in increasing order: each is a special case of the next."""

FUNCTIONS: Final[dict[str, BackgroundFunction]] = {
    **{f"p{order}": _power_series_function(order) for order in range(2, 7)},
    "ua2": UA2,
    "ua2_5": UA2_5,
}
"""Every named analytic background function."""

ALTERNATIVE_FUNCTIONS: Final = ("ua2", "ua2_5")
"""Families outside the nested set, used to draw toys for the spurious-signal test."""


def get_function(name: str) -> BackgroundFunction:
    """The analytic background function called `name` (p2..p6, ua2)."""
    if name not in FUNCTIONS:
        raise InvalidInputError(
            f"unknown background function {name!r}; known functions are {sorted(FUNCTIONS)}"
        )
    return FUNCTIONS[name]


def nested_start(
    lower_function: BackgroundFunction,
    lower_theta: npt.ArrayLike,
    function: BackgroundFunction,
) -> FloatArray | None:
    """Shape parameters of `function` that reproduce the lower fitted function exactly.

    Terms of `function` missing in the lower one start at 0. Returns None when the two
    functions are not nested log-linear functions (no exact embedding exists).
    """
    if not (lower_function.terms and function.terms):
        return None
    if not set(lower_function.terms) <= set(function.terms):
        return None
    values = dict(zip(lower_function.terms, np.asarray(lower_theta, dtype=float), strict=True))
    return np.array([values.get(term, 0.0) for term in function.terms], dtype=np.float64)


@cache
def _gauss_legendre(n_points: int) -> tuple[FloatArray, FloatArray]:
    nodes, weights = np.polynomial.legendre.leggauss(n_points)
    return np.asarray(nodes, dtype=np.float64), np.asarray(weights, dtype=np.float64)


def gauss_legendre_nodes(
    edges: npt.ArrayLike, sqrt_s: float, n_points: int = 6
) -> tuple[FloatArray, FloatArray]:
    """Nodes x = m / sqrt_s and weights (GeV) to integrate a per-GeV density over each bin.

    The upper limit of a bin is clipped at sqrt_s (the density vanishes beyond the
    kinematic limit); a bin entirely above sqrt_s gets zero weights. Shapes (n_bins, n_points).
    """
    edge_values = np.asarray(edges, dtype=np.float64)
    if n_points < 1:
        raise InvalidInputError(f"need at least 1 Gauss-Legendre point, got {n_points}")
    if not sqrt_s > 0:
        raise InvalidInputError(f"sqrt_s must be positive (GeV), got {sqrt_s}")
    if edge_values.ndim != 1 or edge_values.size < 2:
        raise InvalidInputError(f"need at least two bin edges, got shape {edge_values.shape}")
    if not (np.all(np.isfinite(edge_values)) and edge_values[0] > 0):
        raise InvalidInputError("bin edges must be finite and positive (GeV)")
    if np.any(np.diff(edge_values) <= 0):
        raise InvalidInputError("bin edges must increase strictly")
    lower = edge_values[:-1]
    upper = np.minimum(edge_values[1:], sqrt_s)
    half = np.clip(upper - lower, 0.0, None) / 2
    centre = np.where(half > 0, lower + half, np.minimum(lower, sqrt_s) / 2)
    unit_nodes, unit_weights = _gauss_legendre(n_points)
    nodes = (centre[:, None] + half[:, None] * unit_nodes[None, :]) / sqrt_s
    weights = half[:, None] * unit_weights[None, :]
    return nodes, weights


def log_bin_integrals(
    function: BackgroundFunction,
    parameters: npt.ArrayLike,
    edges: npt.ArrayLike,
    sqrt_s: float = 13000.0,
    n_points: int = 6,
) -> FloatArray:
    """Log of the integral of f over each bin (ln expected counts); -inf above sqrt_s."""
    params = np.asarray(parameters, dtype=np.float64)
    if params.shape != (function.n_params,):
        raise InvalidInputError(
            f"{function.name} takes {function.n_params} parameters, got shape {params.shape}"
        )
    if not np.all(np.isfinite(params)):
        raise InvalidInputError(f"{function.name} parameters must be finite, got {params}")
    nodes, weights = gauss_legendre_nodes(edges, sqrt_s, n_points)
    inside = weights[:, 0] > 0
    result = np.full(weights.shape[0], -np.inf)
    log_g = function.log_shape(nodes[inside], params[1:])
    peak = np.max(log_g, axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        result[inside] = (
            params[0] + peak[:, 0] + np.log(np.sum(weights[inside] * np.exp(log_g - peak), axis=1))
        )
    return result


def bin_integrals(
    function: BackgroundFunction,
    parameters: npt.ArrayLike,
    edges: npt.ArrayLike,
    sqrt_s: float = 13000.0,
    n_points: int = 6,
) -> FloatArray:
    """Expected counts per bin: the Gauss-Legendre integral of f over each bin (GeV)."""
    return np.exp(log_bin_integrals(function, parameters, edges, sqrt_s, n_points))
