"""Symbolic-regression fallback for background fits when no analytic function describes a spectrum.

The search (PHYSICS.md section 5) models g = ln f, the logarithm of the background density per
GeV, as an expression in the features x = m / sqrt_s, ``lnx`` = ln x and ``ln1mx`` = ln(1 - x).
It regresses ln(n / width) of the non-empty bins with Poisson weights (sigma_i = 1 / sqrt(n_i)),
keeps the whole accuracy-complexity Pareto front of the search, refits the constants of every
front member with the extended binned Poisson likelihood (iminuit; expected counts are the
Gauss-Legendre integrals of f over the bins) and chooses the member with the smallest penalised
deviance (BIC by default: D + k ln N_bins, k free constants).

Expressions are text. They are parsed with Python's ``ast`` module against a whitelist (numbers,
the three feature names, named constants ``c0``, ``c1``, ..., the operators + - * / ** and the
functions in `EXPRESSION_FUNCTIONS`) and compiled into numpy closures: model output is never
passed to ``eval``.

Backends: ``pyoperon`` (always installed with the ``sr`` extra) and ``pysr``, used only when a
Julia runtime is on PATH (importing PySR without Julia would try to download one).
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import logging
import math
import re
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from iminuit import Minuit
from scipy import linalg, stats

from core.errors import FitDidNotConvergeError, FitError, InvalidInputError

FloatArray = npt.NDArray[np.float64]
SymbolicBackend = Literal["auto", "pyoperon", "pysr"]
ParetoSelection = Literal["bic", "aic"]

logger = logging.getLogger(__name__)

FEATURE_NAMES: Final = ("x", "lnx", "ln1mx")
"""Variables an expression may use: x = m / sqrt_s, ln x and ln(1 - x)."""

EXPRESSION_FUNCTIONS: Final[Mapping[str, Callable[[FloatArray], FloatArray]]] = {
    "exp": np.exp,
    "log": np.log,
    "sqrt": np.sqrt,
    "square": np.square,
    "cbrt": np.cbrt,
    "abs": np.abs,
    "sin": np.sin,
    "cos": np.cos,
    "tanh": np.tanh,
}
"""Functions an expression may call, each with exactly one argument."""

_PARAMETER_NAME: Final = re.compile(r"c(0|[1-9][0-9]{0,3})")
_MAX_EXPRESSION_CHARACTERS: Final = 20_000
_MAX_EXPRESSION_NODES: Final = 2_000
_GAUSS_LEGENDRE_ORDER: Final = 6
_RANK_TOLERANCE: Final = 1e-6
_MIN_NONEMPTY_BINS: Final = 8
_PYOPERON_SYMBOLS: Final = "add,sub,mul,div,exp,log,constant,variable"

_Evaluator = Callable[[Mapping[str, FloatArray]], FloatArray]


# --------------------------------------------------------------------------- expressions


@dataclass(frozen=True)
class SymbolicExpression:
    """ln of a background density per GeV, as whitelisted text in x, lnx, ln1mx and c0..ck.

    Build it with `parse_expression` (named constants stay parameters, numbers stay fixed)
    or `lift_constants` (every number of a search result becomes a parameter).
    """

    text: str
    parameter_names: tuple[str, ...]
    _evaluate: _Evaluator = field(repr=False, compare=False)

    def log_density(self, x: npt.ArrayLike, parameters: npt.ArrayLike) -> FloatArray:
        """Return g(x) = ln f, f in GeV^-1, at x = m / sqrt_s in (0, 1); may hold non-finite values."""
        x_values = np.asarray(x, dtype=np.float64)
        values = np.asarray(parameters, dtype=np.float64).reshape(-1)
        if values.size != len(self.parameter_names):
            raise InvalidInputError(
                f"expression {self.text!r} has {len(self.parameter_names)} constants "
                f"{self.parameter_names}, but {values.size} values were given"
            )
        with np.errstate(all="ignore"):
            environment: dict[str, FloatArray] = {
                "x": x_values,
                "lnx": np.log(x_values),
                "ln1mx": np.log1p(-x_values),
            }
            environment.update(
                {name: np.float64(value) for name, value in zip(self.parameter_names, values)}  # type: ignore[misc]
            )
            result = np.broadcast_to(self._evaluate(environment), x_values.shape)
        return np.asarray(result, dtype=np.float64)

    def density(self, mass: npt.ArrayLike, parameters: npt.ArrayLike, sqrt_s: float) -> FloatArray:
        """Return the background density f(m) in events per GeV at masses `mass` (GeV)."""
        x = np.asarray(mass, dtype=np.float64) / sqrt_s
        with np.errstate(all="ignore"):
            return np.asarray(np.exp(self.log_density(x, parameters)), dtype=np.float64)


def _reject(text: str, what: str) -> InvalidInputError:
    return InvalidInputError(
        f"expression {text[:200]!r} contains {what}; allowed are numbers, the variables "
        f"{FEATURE_NAMES}, constants c0, c1, ..., the operators + - * / ** (or ^), unary minus "
        f"and the functions {sorted(EXPRESSION_FUNCTIONS)} with one argument each"
    )


def _compile(node: ast.AST, text: str, parameters: set[str]) -> _Evaluator:
    """Turn a whitelisted AST node into a numpy closure; anything else is an InvalidInputError."""
    if isinstance(node, ast.Expression):
        return _compile(node.body, text, parameters)
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise _reject(text, f"the literal {node.value!r}")
        constant = np.float64(node.value)
        if not np.isfinite(constant):
            raise _reject(text, f"the non-finite number {node.value!r}")
        return lambda _env: constant  # type: ignore[return-value]
    if isinstance(node, ast.Name):
        name = node.id
        if name in FEATURE_NAMES:
            return lambda env: env[name]
        if _PARAMETER_NAME.fullmatch(name):
            parameters.add(name)
            return lambda env: env[name]
        raise _reject(text, f"the unknown name {name!r}")
    if isinstance(node, ast.UnaryOp):
        operand = _compile(node.operand, text, parameters)
        if isinstance(node.op, ast.USub):
            return lambda env: np.negative(operand(env))
        if isinstance(node.op, ast.UAdd):
            return operand
        raise _reject(text, f"the unary operator {type(node.op).__name__}")
    if isinstance(node, ast.BinOp):
        left = _compile(node.left, text, parameters)
        right = _compile(node.right, text, parameters)
        binary: dict[type[ast.operator], Callable[[Any, Any], FloatArray]] = {
            ast.Add: np.add,
            ast.Sub: np.subtract,
            ast.Mult: np.multiply,
            ast.Div: np.divide,
            ast.Pow: np.power,
        }
        operation = binary.get(type(node.op))
        if operation is None:
            raise _reject(text, f"the operator {type(node.op).__name__}")
        return lambda env: operation(left(env), right(env))
    if isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in EXPRESSION_FUNCTIONS:
            called = node.func.id if isinstance(node.func, ast.Name) else type(node.func).__name__
            raise _reject(text, f"a call of {called!r}")
        if node.keywords or len(node.args) != 1 or isinstance(node.args[0], ast.Starred):
            raise _reject(text, f"a call of {node.func.id!r} without exactly one argument")
        function = EXPRESSION_FUNCTIONS[node.func.id]
        argument = _compile(node.args[0], text, parameters)
        return lambda env: function(argument(env))
    raise _reject(text, f"a {type(node).__name__} element")


def _parse_tree(text: str) -> ast.Expression:
    if not isinstance(text, str) or not text.strip():
        raise InvalidInputError(f"an expression must be non-empty text, found {text!r}")
    if len(text) > _MAX_EXPRESSION_CHARACTERS:
        raise InvalidInputError(
            f"expression has {len(text)} characters, at most {_MAX_EXPRESSION_CHARACTERS} "
            "are accepted; simplify it"
        )
    try:
        tree = ast.parse(text.replace("^", "**"), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as error:
        raise InvalidInputError(
            f"expression {text[:200]!r} is not a valid formula ({error}); write it with "
            "numbers, x, lnx, ln1mx, c0.., + - * / ** and whitelisted functions"
        ) from error
    n_nodes = sum(1 for _ in ast.walk(tree))
    if n_nodes > _MAX_EXPRESSION_NODES:
        raise InvalidInputError(
            f"expression has {n_nodes} syntax nodes, at most {_MAX_EXPRESSION_NODES} are "
            "accepted; simplify it"
        )
    return tree


def _build(tree: ast.Expression, text: str) -> SymbolicExpression:
    parameters: set[str] = set()
    try:
        evaluator = _compile(tree, text, parameters)
        canonical = ast.unparse(tree)
    except RecursionError as error:
        raise InvalidInputError(
            f"expression {text[:200]!r} is nested too deeply to evaluate; simplify it"
        ) from error
    names = tuple(sorted(parameters, key=lambda name: int(name[1:])))
    return SymbolicExpression(text=canonical, parameter_names=names, _evaluate=evaluator)


def parse_expression(text: str) -> SymbolicExpression:
    """Parse stored text of ln f into a safe evaluator; names c0, c1, ... are its constants.

    Raises InvalidInputError for anything outside the whitelist (attribute access, subscripts,
    unknown names or functions, keywords, lambdas, comprehensions, strings, ...).
    """
    return _build(_parse_tree(text), text)


class _ConstantLifter(ast.NodeTransformer):
    """Replace every number by a named constant c_k, remembering its value as a start value."""

    def __init__(self) -> None:
        self.values: list[float] = []

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        if (
            isinstance(node.op, ast.USub)
            and isinstance(node.operand, ast.Constant)
            and isinstance(node.operand.value, int | float)
            and not isinstance(node.operand.value, bool)
        ):
            return self._lift(-float(node.operand.value))
        return self.generic_visit(node)

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        node.left = self.visit(node.left)
        exponent = node.right
        keep_integer_exponent = (
            isinstance(node.op, ast.Pow)
            and isinstance(exponent, ast.Constant)
            and isinstance(exponent.value, int | float)
            and float(exponent.value).is_integer()
        )
        if not keep_integer_exponent:
            node.right = self.visit(node.right)
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, int | float) and not isinstance(node.value, bool):
            return self._lift(float(node.value))
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        if _PARAMETER_NAME.fullmatch(node.id):
            raise InvalidInputError(
                f"a search result may not contain the constant name {node.id!r}; "
                "its constants must be numbers"
            )
        return node

    def _lift(self, value: float) -> ast.Name:
        if not math.isfinite(value):
            raise InvalidInputError(f"a search result holds the non-finite constant {value}")
        self.values.append(value)
        return ast.Name(id=f"c{len(self.values) - 1}", ctx=ast.Load())


def lift_constants(text: str) -> tuple[SymbolicExpression, FloatArray]:
    """Parse a search result and turn each number into a named constant c0, c1, ...

    Integer exponents (x ** 2) stay fixed. Returns the expression and the numbers as start
    values of its constants.
    """
    tree = _parse_tree(text)
    lifter = _ConstantLifter()
    lifted = ast.fix_missing_locations(lifter.visit(tree))
    if not isinstance(lifted, ast.Expression):  # pragma: no cover - the lifter keeps the root
        raise InvalidInputError(f"expression {text[:200]!r} did not parse to a formula")
    expression = _build(lifted, text)
    return expression, np.asarray(lifter.values, dtype=np.float64)


# --------------------------------------------------------------------------- histogram input


@dataclass(frozen=True)
class _Spectrum:
    lower: FloatArray
    upper: FloatArray
    counts: FloatArray
    first_bin: int
    stop_bin: int
    included: npt.NDArray[np.bool_]


def _select_bins(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float] | None,
    sqrt_s: float,
    excluded_window: tuple[float, float] | None,
) -> _Spectrum:
    """Check a histogram and return the bins of [fit start, last non-empty bin] (GeV)."""
    edge_values = np.asarray(edges, dtype=np.float64)
    count_values = np.asarray(counts, dtype=np.float64)
    if not (np.isfinite(sqrt_s) and sqrt_s > 0):
        raise InvalidInputError(f"sqrt_s must be a positive energy in GeV, found {sqrt_s}")
    if edge_values.ndim != 1 or count_values.ndim != 1:
        raise InvalidInputError(
            f"edges and counts must be one-dimensional, found shapes {edge_values.shape} "
            f"and {count_values.shape}"
        )
    if count_values.size == 0:
        raise InvalidInputError("the spectrum is empty: it has no bins; give at least one bin")
    if edge_values.size != count_values.size + 1:
        raise InvalidInputError(
            f"a histogram of {count_values.size} bins needs {count_values.size + 1} edges, "
            f"found {edge_values.size}"
        )
    if not np.all(np.isfinite(edge_values)) or np.any(np.diff(edge_values) <= 0):
        raise InvalidInputError("bin edges must be finite and strictly increasing (GeV)")
    if not np.all(np.isfinite(count_values)):
        raise InvalidInputError(
            f"counts hold {int(np.sum(~np.isfinite(count_values)))} NaN or infinite values; "
            "fix the histogram before fitting"
        )
    if np.any(count_values < 0):
        raise InvalidInputError(
            f"counts must be non-negative event counts, found minimum {count_values.min()}"
        )
    low, high = (edge_values[0], edge_values[-1]) if fit_range is None else fit_range
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise InvalidInputError(
            f"fit range must be [low, high] GeV with low < high, found {fit_range}"
        )
    tolerance = 1e-9 * max(abs(high), 1.0)
    inside = (edge_values[:-1] >= low - tolerance) & (edge_values[1:] <= high + tolerance)
    if not np.any(inside):
        raise InvalidInputError(
            f"fit range [{low}, {high}] GeV holds no whole bin of the histogram, whose edges "
            f"span [{edge_values[0]}, {edge_values[-1]}] GeV; choose a range inside it"
        )
    positions = np.flatnonzero(inside)
    nonempty = positions[count_values[positions] > 0]
    if nonempty.size == 0:
        raise InvalidInputError(
            f"all counts are zero in the fit range [{low}, {high}] GeV; nothing to fit"
        )
    first, stop = int(positions[0]), int(nonempty[-1]) + 1
    lower, upper = edge_values[first:stop], edge_values[first + 1 : stop + 1]
    if lower[0] <= 0 or upper[-1] >= sqrt_s:
        raise InvalidInputError(
            f"fitted bins span [{lower[0]}, {upper[-1]}] GeV, which must lie inside "
            f"(0, sqrt_s = {sqrt_s}) GeV so that ln x and ln(1 - x) exist; shorten the range"
        )
    included = np.ones(stop - first, dtype=np.bool_)
    if excluded_window is not None:
        w_low, w_high = excluded_window
        if not w_low < w_high:
            raise InvalidInputError(
                f"excluded window must be [low, high] GeV, found {excluded_window}"
            )
        included = ~((lower >= w_low - tolerance) & (upper <= w_high + tolerance))
    n_nonempty = int(np.sum(count_values[first:stop][included] > 0))
    if n_nonempty < _MIN_NONEMPTY_BINS:
        raise InvalidInputError(
            f"the fit range has {n_nonempty} non-empty bins; a symbolic fit needs at least "
            f"{_MIN_NONEMPTY_BINS}; widen the range or use an analytic function"
        )
    return _Spectrum(lower, upper, count_values[first:stop], first, stop, included)


# --------------------------------------------------------------------------- Poisson refit


def _gauss_legendre_nodes(
    lower: FloatArray, upper: FloatArray, sqrt_s: float
) -> tuple[FloatArray, FloatArray]:
    """Return x = m / sqrt_s at the Gauss-Legendre nodes of each bin and weights in GeV."""
    nodes, weights = np.polynomial.legendre.leggauss(_GAUSS_LEGENDRE_ORDER)
    half = 0.5 * (upper - lower)
    middle = 0.5 * (upper + lower)
    masses = middle[:, None] + half[:, None] * nodes[None, :]
    return masses / sqrt_s, half[:, None] * weights[None, :]


def expected_counts(
    expression: SymbolicExpression | str,
    parameters: npt.ArrayLike,
    edges: npt.ArrayLike,
    sqrt_s: float,
) -> FloatArray:
    """Return the expected events per bin: the integral of f over each bin (Gauss-Legendre).

    Raises FitError when f is not finite and positive on some bin.
    """
    model = parse_expression(expression) if isinstance(expression, str) else expression
    edge_values = np.asarray(edges, dtype=np.float64)
    x_nodes, weights = _gauss_legendre_nodes(edge_values[:-1], edge_values[1:], sqrt_s)
    expected = _integrate(model, np.asarray(parameters, dtype=np.float64), x_nodes, weights)
    if not (np.all(np.isfinite(expected)) and np.all(expected > 0)):
        raise FitError(
            f"expression {model.text!r} gives non-finite or non-positive expected counts on "
            f"{int(np.sum(~(np.isfinite(expected) & (expected > 0))))} bins; check the "
            "parameters and that the bins lie inside (0, sqrt_s)"
        )
    return expected


def _integrate(
    model: SymbolicExpression, parameters: FloatArray, x_nodes: FloatArray, weights: FloatArray
) -> FloatArray:
    with np.errstate(all="ignore"):
        density = np.exp(model.log_density(x_nodes, parameters))
        return np.asarray(np.sum(density * weights, axis=1), dtype=np.float64)


def _deviance(counts: FloatArray, expected: FloatArray) -> float:
    """Poisson deviance 2 sum(mu - n + n ln(n / mu)), the n = 0 terms being 2 mu."""
    positive = counts > 0
    log_ratio = np.zeros_like(counts)
    log_ratio[positive] = np.log(counts[positive] / expected[positive])
    return float(2.0 * np.sum(expected - counts + counts * log_ratio))


def _identifiable_parameters(
    model: SymbolicExpression, values: FloatArray, x_centres: FloatArray, counts: FloatArray
) -> npt.NDArray[np.bool_]:
    """Flag the constants that the data can determine independently of the others.

    Search results often carry redundant constants (a global scale times coefficients); the
    Poisson-weighted Jacobian of ln f is column-pivoted QR-decomposed and constants outside
    its numerical rank stay fixed at their search values.
    """
    if values.size == 0:
        return np.zeros(0, dtype=np.bool_)
    weight = np.sqrt(np.maximum(counts, 1.0))
    columns = []
    for index in range(values.size):
        step = 1e-6 * max(abs(values[index]), 1e-3)
        up, down = values.copy(), values.copy()
        up[index] += step
        down[index] -= step
        derivative = (model.log_density(x_centres, up) - model.log_density(x_centres, down)) / (
            2 * step
        )
        columns.append(derivative * weight)
    jacobian = np.column_stack(columns)
    free = np.zeros(values.size, dtype=np.bool_)
    if not np.all(np.isfinite(jacobian)):
        return free
    norms = np.linalg.norm(jacobian, axis=0)
    usable = norms > 0
    if not np.any(usable):
        return free
    scaled = jacobian[:, usable] / norms[usable]
    _, r_matrix, pivots = linalg.qr(scaled, mode="economic", pivoting=True)
    diagonal = np.abs(np.diag(r_matrix))
    rank = int(np.sum(diagonal > _RANK_TOLERANCE * diagonal[0]))
    free[np.flatnonzero(usable)[pivots[:rank]]] = True
    return free


@dataclass(frozen=True)
class SymbolicFitResult:
    """An expression for ln f (f in events per GeV) with constants fitted by Poisson likelihood.

    `parameters` holds every constant; those not in `free_parameters` are fixed at the
    search's values (redundant in the search's form). `p_value` is the deviance p-value with
    `ndf` = fitted bins - free constants; `expected` the events per fitted bin.
    """

    expression: str
    parameter_names: tuple[str, ...]
    parameters: tuple[float, ...]
    errors: tuple[float, ...]
    free_parameters: tuple[str, ...]
    covariance: FloatArray
    nll: float
    deviance: float
    chi2: float
    ndf: int
    p_value: float
    valid: bool
    expected: FloatArray
    fit_range: tuple[float, float]
    bins: tuple[int, int]
    sqrt_s: float


def fit_expression(
    expression: SymbolicExpression | str,
    start_values: npt.ArrayLike,
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    *,
    fit_range: tuple[float, float] | None = None,
    sqrt_s: float = 13000.0,
    free_parameters: tuple[str, ...] | None = None,
    excluded_window: tuple[float, float] | None = None,
) -> SymbolicFitResult:
    """Fit the constants of an expression for ln f to a spectrum by extended binned Poisson NLL.

    Bins from the fit start (GeV) to the last non-empty bin are fitted; `excluded_window`
    (GeV) drops whole bins from the likelihood. `free_parameters` None frees the constants the
    data can identify. Raises FitDidNotConvergeError when Minuit finds no valid minimum with an
    accurate covariance.
    """
    model = parse_expression(expression) if isinstance(expression, str) else expression
    starts = np.asarray(start_values, dtype=np.float64).reshape(-1)
    if starts.size != len(model.parameter_names) or not np.all(np.isfinite(starts)):
        raise InvalidInputError(
            f"expression {model.text!r} needs {len(model.parameter_names)} finite start values "
            f"for {model.parameter_names}, found {starts.tolist()}"
        )
    spectrum = _select_bins(edges, counts, fit_range, sqrt_s, excluded_window)
    x_nodes, weights = _gauss_legendre_nodes(spectrum.lower, spectrum.upper, sqrt_s)
    x_centres = 0.5 * (spectrum.lower + spectrum.upper) / sqrt_s
    used = spectrum.included
    if free_parameters is None:
        free = _identifiable_parameters(model, starts, x_centres[used], spectrum.counts[used])
    else:
        unknown = sorted(set(free_parameters) - set(model.parameter_names))
        if unknown:
            raise InvalidInputError(
                f"free parameters {unknown} are not constants of {model.text!r}, whose "
                f"constants are {model.parameter_names}"
            )
        free = np.array([name in free_parameters for name in model.parameter_names], dtype=bool)
    n_free = int(np.sum(free))
    n_used = int(np.sum(used))
    if n_free >= n_used:
        raise InvalidInputError(
            f"the fit has {n_used} bins but {n_free} free constants; it needs more bins than "
            "constants; widen the range or simplify the expression"
        )
    result = _minimise(model, starts, free, x_nodes[used], weights[used], spectrum.counts[used])
    values, errors, covariance, nll, converged = result
    if not converged:
        raise FitDidNotConvergeError(
            f"Minuit found no valid minimum with accurate covariance for {model.text!r} on "
            f"[{spectrum.lower[0]}, {spectrum.upper[-1]}] GeV from the search values and two "
            "retries; try another seed or a simpler expression"
        )
    expected_all = _integrate(model, values, x_nodes, weights)
    expected = expected_all[used]
    observed = spectrum.counts[used]
    deviance = _deviance(observed, expected)
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    ndf = n_used - n_free
    return SymbolicFitResult(
        expression=model.text,
        parameter_names=model.parameter_names,
        parameters=tuple(float(value) for value in values),
        errors=tuple(float(error) for error in errors),
        free_parameters=tuple(
            name for name, is_free in zip(model.parameter_names, free) if is_free
        ),
        covariance=covariance,
        nll=nll,
        deviance=deviance,
        chi2=chi2,
        ndf=ndf,
        p_value=float(stats.chi2.sf(deviance, ndf)),
        valid=True,
        expected=expected_all,
        fit_range=(float(spectrum.lower[0]), float(spectrum.upper[-1])),
        bins=(spectrum.first_bin, spectrum.stop_bin),
        sqrt_s=float(sqrt_s),
    )


def _minimise(
    model: SymbolicExpression,
    starts: FloatArray,
    free: npt.NDArray[np.bool_],
    x_nodes: FloatArray,
    weights: FloatArray,
    counts: FloatArray,
) -> tuple[FloatArray, FloatArray, FloatArray, float, bool]:
    """Minimise sum(mu - n ln mu) over the free constants; return values, errors, cov, nll, ok."""
    free_index = np.flatnonzero(free)
    fixed_values = starts.copy()
    # Constant term of the Poisson NLL so that `nll` is comparable across expressions.
    offset = float(np.sum(counts[counts > 0] * np.log(counts[counts > 0]) - counts[counts > 0]))
    bad_value = 1e30

    def negative_log_likelihood(free_values: FloatArray) -> float:
        values = fixed_values.copy()
        values[free_index] = free_values
        expected = _integrate(model, values, x_nodes, weights)
        if not (np.all(np.isfinite(expected)) and np.all(expected > 0)):
            return bad_value
        return float(np.sum(expected - counts * np.log(expected))) + offset

    minuit = Minuit(negative_log_likelihood, starts[free_index])
    minuit.errordef = Minuit.LIKELIHOOD
    minuit.errors = 0.01 * np.maximum(np.abs(starts[free_index]), 1e-2)
    minuit.strategy = 1
    converged = False
    for attempt in range(3):
        if attempt == 2:
            minuit.strategy = 2
            minuit.simplex()
        minuit.migrad(ncall=20_000)
        if minuit.valid:
            minuit.hesse()
            if minuit.valid and minuit.accurate and minuit.fval < bad_value:
                converged = True
                break
    values = fixed_values.copy()
    values[free_index] = np.asarray(minuit.values, dtype=np.float64)
    errors = np.zeros_like(values)
    covariance = np.zeros((free_index.size, free_index.size))
    if converged and minuit.covariance is not None:
        covariance = np.asarray(minuit.covariance, dtype=np.float64)
        errors[free_index] = np.asarray(minuit.errors, dtype=np.float64)
    return values, errors, covariance, float(minuit.fval), converged


# --------------------------------------------------------------------------- search backends


def pysr_availability() -> tuple[bool, str]:
    """Tell whether PySR can run here without downloading anything, and why not if it can not."""
    if shutil.which("julia") is None:
        return False, "no Julia runtime on PATH (PySR needs one and would try to download it)"
    if importlib.util.find_spec("pysr") is None:
        return False, "the pysr package is not installed (pip install 'anomscan[pysr]')"
    return True, "Julia runtime and pysr found"


def resolve_backend(backend: SymbolicBackend) -> tuple[Literal["pyoperon", "pysr"], str]:
    """Choose the search backend: PySR when asked for (or 'auto') and usable, else pyoperon."""
    if backend not in ("auto", "pyoperon", "pysr"):
        raise InvalidInputError(
            f"symbolic backend must be 'auto', 'pyoperon' or 'pysr', found {backend!r}"
        )
    if backend == "pyoperon":
        return "pyoperon", "pyoperon as requested"
    usable, reason = pysr_availability()
    if usable:
        return "pysr", f"pysr: {reason}"
    message = f"PySR not used: {reason}; falling back to pyoperon"
    logger.warning(message)
    return "pyoperon", message


@dataclass(frozen=True)
class _FrontMember:
    text: str
    complexity: int


def _search_pyoperon(
    features: FloatArray,
    target: FloatArray,
    sigma: FloatArray,
    *,
    seed: int,
    population_size: int,
    generations: int,
    max_length: int,
) -> list[_FrontMember]:
    """Run pyoperon's NSGA-II on (weighted Gaussian likelihood, length); return its front."""
    try:
        from pyoperon.sklearn import SymbolicRegressor
    except ImportError as error:
        raise FitError(
            "the pyoperon backend is not installed; install anomscan with the 'sr' extra"
        ) from error
    regressor = SymbolicRegressor(
        allowed_symbols=_PYOPERON_SYMBOLS,
        objectives=["gauss", "length"],
        uncertainty=[float(value) for value in sigma],
        population_size=population_size,
        generations=generations,
        max_length=max_length,
        max_evaluations=10**7,
        optimizer_iterations=10,
        random_state=seed,
        n_threads=1,
    )
    regressor.fit(features, target)
    return [
        _FrontMember(
            text=regressor.get_model_string(
                solution["tree"], precision=12, names=list(FEATURE_NAMES)
            ),
            complexity=int(solution["length"]),
        )
        for solution in regressor.pareto_front_
    ]


def _search_pysr(  # pragma: no cover - needs a Julia runtime, absent on the CI machines
    features: FloatArray,
    target: FloatArray,
    sigma: FloatArray,
    *,
    seed: int,
    population_size: int,
    generations: int,
    max_length: int,
) -> list[_FrontMember]:
    """Run PySR (deterministic, serial) with weights 1 / sigma^2; return its Pareto front."""
    import pysr

    regressor = pysr.PySRRegressor(
        binary_operators=["+", "-", "*", "/"],
        unary_operators=["exp", "log"],
        niterations=generations,
        population_size=population_size,
        maxsize=max_length,
        random_state=seed,
        deterministic=True,
        parallelism="serial",
        progress=False,
        verbosity=0,
    )
    regressor.fit(features, target, weights=1.0 / sigma**2, variable_names=list(FEATURE_NAMES))
    equations = regressor.equations_
    return [
        _FrontMember(text=str(row["equation"]), complexity=int(row["complexity"]))
        for _, row in equations.iterrows()
    ]


# --------------------------------------------------------------------------- the fallback


@dataclass(frozen=True)
class SymbolicCandidate:
    """One member of the search's Pareto front after its Poisson refit (for the audit log)."""

    expression: str
    complexity: int
    n_free: int
    deviance: float
    p_value: float
    criterion: float
    converged: bool
    reason: str


@dataclass(frozen=True)
class SymbolicSearchResult:
    """The chosen expression with its Poisson fit, and the whole front it was chosen from."""

    fit: SymbolicFitResult
    candidates: tuple[SymbolicCandidate, ...]
    chosen_index: int
    selection: ParetoSelection
    backend: Literal["pyoperon", "pysr"]
    backend_message: str
    seed: int


def _criterion(deviance: float, n_free: int, n_bins: int, selection: ParetoSelection) -> float:
    penalty = math.log(n_bins) if selection == "bic" else 2.0
    return deviance + penalty * n_free


def symbolic_fit(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    *,
    fit_range: tuple[float, float] | None = None,
    sqrt_s: float = 13000.0,
    backend: SymbolicBackend = "auto",
    seed: int = 0,
    population_size: int = 300,
    generations: int = 60,
    max_length: int = 25,
    selection: ParetoSelection = "bic",
) -> SymbolicSearchResult:
    """Search ln f(x, ln x, ln(1 - x)) on a spectrum and return the best refitted Pareto member.

    The search fits ln(n / width) per GeV of the non-empty bins at the bin centres with
    sigma = 1 / sqrt(n); each member of its accuracy-complexity front is refitted with the
    extended binned Poisson likelihood, and the member with the smallest deviance + penalty x
    free constants is chosen (`selection` 'bic': ln N_bins, 'aic': 2). Seeded and
    reproducible. Raises FitDidNotConvergeError when no member converges.
    """
    if selection not in ("bic", "aic"):
        raise InvalidInputError(f"selection must be 'bic' or 'aic', found {selection!r}")
    for name, value, low in (
        ("population_size", population_size, 10),
        ("generations", generations, 1),
        ("max_length", max_length, 3),
    ):
        if not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, found {value!r}")
    if not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2^63), found {seed!r}")
    spectrum = _select_bins(edges, counts, fit_range, sqrt_s, None)
    chosen_backend, message = resolve_backend(backend)
    width = spectrum.upper - spectrum.lower
    nonempty = spectrum.counts > 0
    x_centres = (0.5 * (spectrum.lower + spectrum.upper) / sqrt_s)[nonempty]
    features = np.column_stack([x_centres, np.log(x_centres), np.log1p(-x_centres)])
    target = np.log(spectrum.counts[nonempty] / width[nonempty])
    sigma = 1.0 / np.sqrt(spectrum.counts[nonempty])
    search = _search_pysr if chosen_backend == "pysr" else _search_pyoperon
    front = search(
        features,
        target,
        sigma,
        seed=seed,
        population_size=population_size,
        generations=generations,
        max_length=max_length,
    )
    fit_edges = np.append(spectrum.lower, spectrum.upper[-1])
    n_bins = spectrum.counts.size
    candidates: list[SymbolicCandidate] = []
    fits: list[SymbolicFitResult | None] = []
    for member in front:
        fit: SymbolicFitResult | None = None
        try:
            expression, starts = lift_constants(member.text)
            fit = fit_expression(expression, starts, fit_edges, spectrum.counts, sqrt_s=sqrt_s)
        except (FitError, InvalidInputError) as error:
            candidates.append(
                SymbolicCandidate(
                    expression=member.text,
                    complexity=member.complexity,
                    n_free=0,
                    deviance=math.inf,
                    p_value=0.0,
                    criterion=math.inf,
                    converged=False,
                    reason=str(error),
                )
            )
            fits.append(None)
            continue
        n_free = len(fit.free_parameters)
        candidates.append(
            SymbolicCandidate(
                expression=fit.expression,
                complexity=member.complexity,
                n_free=n_free,
                deviance=fit.deviance,
                p_value=fit.p_value,
                criterion=_criterion(fit.deviance, n_free, n_bins, selection),
                converged=True,
                reason="",
            )
        )
        fits.append(fit)
    usable = [index for index, fit in enumerate(fits) if fit is not None]
    if not usable:
        raise FitDidNotConvergeError(
            f"none of the {len(front)} expressions of the {chosen_backend} Pareto front could be "
            "refitted with the Poisson likelihood; try another seed or more generations"
        )
    chosen = min(usable, key=lambda index: candidates[index].criterion)
    chosen_fit = fits[chosen]
    assert chosen_fit is not None
    return SymbolicSearchResult(
        fit=dataclasses.replace(chosen_fit, bins=(spectrum.first_bin, spectrum.stop_bin)),
        candidates=tuple(candidates),
        chosen_index=chosen,
        selection=selection,
        backend=chosen_backend,
        backend_message=message,
        seed=seed,
    )
