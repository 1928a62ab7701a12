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
from scipy import optimize, stats

from core.errors import FitDidNotConvergeError, FitError, InvalidInputError
from core.fit import FitResult, SpectrumFitProblem, fit_quality, prepare_spectrum
from core.fitfunctions import BackgroundFunction

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
_RANK_TOLERANCE: Final = 1e-13
_MIN_FILLED_BINS: Final = 8
_BAD_NLL: Final = 1e30
_NORMALISATION_TOLERANCE: Final = 1e-8
_BAD_RESIDUAL: Final = 1e15
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
        """Return g = ln f (f in GeV^-1) at x = m / sqrt_s in (0, 1); may be non-finite."""
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
            for name, value in zip(self.parameter_names, values, strict=True):
                environment[name] = np.asarray(value, dtype=np.float64)
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


# --------------------------------------------------------------------------- Poisson refit


def _bin_integrals(
    model: SymbolicExpression, constants: FloatArray, nodes: FloatArray, weights: FloatArray
) -> FloatArray:
    """Integral of exp(g) over each bin (events), from Gauss-Legendre nodes x and weights in GeV."""
    with np.errstate(all="ignore"):
        density = np.exp(model.log_density(nodes, constants))
        return np.asarray(np.sum(density * weights, axis=1), dtype=np.float64)


def _usable(expected: FloatArray) -> bool:
    return bool(np.all(np.isfinite(expected)) and np.all(expected > 0))


def _jacobian(
    function: Callable[[FloatArray], FloatArray], constants: FloatArray, step: float | None = None
) -> FloatArray | None:
    """Central-difference derivatives of `function` (a vector) by each constant, or None.

    Steps are `step`, or 1e-5 relative (at least 1e-7) when None.
    """
    columns = []
    for index in range(constants.size):
        delta = step if step is not None else 1e-5 * max(abs(constants[index]), 1e-2)
        up, down = constants.copy(), constants.copy()
        up[index] += delta
        down[index] -= delta
        columns.append((function(up) - function(down)) / (2 * delta))
    jacobian = np.column_stack(columns)
    return jacobian if np.all(np.isfinite(jacobian)) else None


def _whitened_directions(information: FloatArray) -> FloatArray:
    """Return T (constants x k) with T^T I T = 1 on the k directions that the data determine.

    Directions whose information, relative to the diagonal, is below `_RANK_TOLERANCE` are
    exact redundancies of the form (a global scale times coefficients, log(c x) = log c +
    log x, or the normalisation in a multinomial fit) and are left out.
    """
    scale = np.sqrt(np.clip(np.diag(information), 0.0, None))
    usable = scale > _RANK_TOLERANCE * scale.max(initial=0.0)
    directions = np.zeros((information.shape[0], 0))
    if not np.any(usable):
        return directions
    correlation = information[np.ix_(usable, usable)] / np.outer(scale[usable], scale[usable])
    eigenvalues, eigenvectors = np.linalg.eigh(correlation)
    keep = eigenvalues > _RANK_TOLERANCE * eigenvalues.max()
    directions = np.zeros((information.shape[0], int(np.sum(keep))))
    directions[usable] = eigenvectors[:, keep] / np.sqrt(eigenvalues[keep]) / scale[usable, None]
    return directions


def _poisson_directions(
    model: SymbolicExpression, constants: FloatArray, nodes: FloatArray, weights: FloatArray
) -> FloatArray:
    """Whitened identifiable directions of the extended Poisson likelihood at `constants`."""
    expected = _bin_integrals(model, constants, nodes, weights)
    jacobian = _jacobian(lambda values: _bin_integrals(model, values, nodes, weights), constants)
    if not _usable(expected) or jacobian is None:
        raise FitError(
            f"expression {model.text!r} gives non-finite or non-positive expected counts "
            "near its start values; it can not be fitted"
        )
    return _whitened_directions(jacobian.T @ (jacobian / expected[:, None]))


@dataclass(frozen=True)
class _PoissonObjective:
    """Half the Poisson deviance as a function of a shift u: constants = centre + T u."""

    model: SymbolicExpression
    nodes: FloatArray
    weights: FloatArray
    counts: FloatArray
    centre: FloatArray
    directions: FloatArray

    def expected(self, shift: FloatArray) -> FloatArray | None:
        """Expected events per bin at constants centre + T shift, or None where unusable."""
        expected = _bin_integrals(
            self.model, self.centre + self.directions @ shift, self.nodes, self.weights
        )
        return expected if _usable(expected) else None

    def half_deviance_terms(self, expected: FloatArray) -> FloatArray:
        """Per-bin mu - n - n ln(mu / n) (mu for n = 0): the NLL minus its saturated value."""
        positive = self.counts > 0
        terms = expected - self.counts
        terms[positive] -= self.counts[positive] * np.log(
            expected[positive] / self.counts[positive]
        )
        return terms

    def residuals(self, shift: FloatArray) -> FloatArray:
        """Signed square roots of the per-bin deviance, whose sum of squares is D."""
        expected = self.expected(shift)
        if expected is None:
            return np.full(self.counts.size, _BAD_RESIDUAL)
        terms = np.clip(self.half_deviance_terms(expected), 0.0, None)
        return np.asarray(np.sign(self.counts - expected) * np.sqrt(2 * terms), dtype=np.float64)

    def __call__(self, shift: FloatArray) -> float:
        """Half the deviance, summed bin by bin so that millions of events keep precision."""
        expected = self.expected(shift)
        return _BAD_NLL if expected is None else float(np.sum(self.half_deviance_terms(expected)))


@dataclass(frozen=True)
class ExpressionFit:
    """Constants of an expression for ln f fitted by the extended binned Poisson likelihood.

    `n_free` independent combinations of the constants were fitted (exact redundancies of
    the form stay at their start values); `deviance` is 2 sum(mu - n + n ln(n / mu)) over the
    bins in the likelihood and `p_value` its chi2 probability with `ndf` = bins - n_free.
    """

    expression: str
    constant_names: tuple[str, ...]
    constants: tuple[float, ...]
    n_free: int
    deviance: float
    ndf: int
    p_value: float
    edm: float = 0.0
    n_calls: int = 0


def refit_expression(
    problem: SpectrumFitProblem,
    expression: SymbolicExpression | str,
    start_values: npt.ArrayLike,
) -> ExpressionFit:
    """Fit the constants of ln f = `expression` to a prepared spectrum (Poisson likelihood).

    Levenberg-Marquardt on the deviance residuals, in coordinates whitened with the expected
    information, brings the start values near the minimum; Migrad polishes and Hesse must
    report an accurate covariance, in up to three rounds re-whitened at the last point.
    Raises FitDidNotConvergeError otherwise.
    """
    model = parse_expression(expression) if isinstance(expression, str) else expression
    starts = np.asarray(start_values, dtype=np.float64).reshape(-1)
    if starts.size != len(model.parameter_names) or not np.all(np.isfinite(starts)):
        raise InvalidInputError(
            f"expression {model.text!r} needs {len(model.parameter_names)} finite start values "
            f"for {model.parameter_names}, found {starts.tolist()}"
        )
    used = problem.used
    nodes, weights = problem.nodes[used], problem.weights[used]
    counts = problem.range_counts[used]
    origin = starts.copy()
    for _ in range(3):
        directions = _poisson_directions(model, origin, nodes, weights)
        n_free = directions.shape[1]
        if n_free >= counts.size:
            raise InvalidInputError(
                f"the fit has {counts.size} bins but {n_free} independent constants in "
                f"{model.text!r}; it needs more bins than constants; widen the fit range or "
                "simplify the expression"
            )
        if n_free == 0:
            raise FitError(f"no constant of {model.text!r} changes the expected counts")
        objective = _PoissonObjective(model, nodes, weights, counts, origin, directions)
        zero = np.zeros(n_free)
        prefit = optimize.least_squares(
            objective.residuals, zero, method="lm", max_nfev=100 * (n_free + 1)
        )
        start = prefit.x if np.all(np.isfinite(prefit.x)) else zero
        if objective(start) > objective(zero):
            start = zero
        minuit = Minuit(objective, start, name=[f"u{index}" for index in range(n_free)])
        minuit.errordef = Minuit.LIKELIHOOD
        minuit.errors = np.ones(n_free)
        minuit.migrad(ncall=20_000)
        origin = origin + directions @ np.asarray(minuit.values, dtype=np.float64)
        if minuit.valid and minuit.fval < _BAD_NLL:
            minuit.hesse()
            if minuit.valid and minuit.accurate:
                deviance = 2.0 * float(minuit.fval)
                ndf = counts.size - n_free
                return ExpressionFit(
                    expression=model.text,
                    constant_names=model.parameter_names,
                    constants=tuple(float(value) for value in origin),
                    n_free=n_free,
                    deviance=deviance,
                    ndf=ndf,
                    p_value=float(stats.chi2.sf(deviance, ndf)),
                    edm=float(minuit.fmin.edm) if minuit.fmin is not None else 0.0,
                    n_calls=int(minuit.nfcn),
                )
    raise FitDidNotConvergeError(
        f"Minuit found no valid minimum with accurate covariance for {model.text!r} in three "
        "rounds of Migrad from the search values; try another seed or a simpler expression"
    )


def symbolic_background(
    problem: SpectrumFitProblem,
    expression: SymbolicExpression | str,
    constants: npt.ArrayLike,
) -> BackgroundFunction:
    """Wrap ln f = ln p1 + g(x; c) as a BackgroundFunction for core.fit and the robustness checks.

    Its shape parameters u1..uk move the constants along the k directions that the profiled
    (multinomial) likelihood of `problem` determines at `constants`: c = constants + T u,
    whitened so that the fit is well conditioned. u = 0 reproduces `constants`.
    """
    model = parse_expression(expression) if isinstance(expression, str) else expression
    return _wrap(problem, model, constants)[0]


def _fit_result(
    problem: SpectrumFitProblem, model: SymbolicExpression, fit: ExpressionFit, notes: list[str]
) -> FitResult:
    """The core.fit FitResult of a converged refit, for the selection and robustness code.

    The wrapped function's parameters are p1 = 1 and u = 0 at the refit's constants; their
    covariance is the inverse expected information of the profiled likelihood (unit in u)
    with the normalisation as core.fit computes it (var p1 = 1 / N).
    """
    function, _, d_log_norm = _wrap(problem, model, fit.constants)
    shape = function.shape
    assert shape is not None
    n_shape = function.n_params - 1
    used = problem.used
    log_integrals = np.log(
        np.sum(np.exp(shape(problem.nodes, np.zeros(n_shape))) * problem.weights, axis=1)
    )
    total = float(problem.range_counts[used].sum())
    log_norm = float(np.log(np.sum(np.exp(log_integrals[used]))))
    p1 = float(np.exp(np.log(total) - log_norm))
    expected = p1 * np.exp(log_integrals)
    covariance = np.zeros((n_shape + 1, n_shape + 1))
    covariance[1:, 1:] = np.eye(n_shape)
    covariance[0, 0] = p1**2 * (1.0 / total + float(d_log_norm @ d_log_norm))
    covariance[0, 1:] = covariance[1:, 0] = -p1 * d_log_norm
    nll, chi2, deviance, ndf, p_value = fit_quality(
        problem.range_counts[used], expected[used], function.n_params
    )
    return FitResult(
        function=function,
        parameters=(p1, *(0.0,) * n_shape),
        errors=tuple(float(np.sqrt(max(value, 0.0))) for value in np.diag(covariance)),
        covariance=covariance,
        nll=nll,
        chi2=chi2,
        deviance=deviance,
        ndf=ndf,
        p_value=p_value,
        valid=True,
        accurate_covariance=True,
        expected=expected,
        first_bin=problem.first_bin,
        stop_bin=problem.stop_bin,
        fit_range=problem.fit_range,
        used=used.copy(),
        sqrt_s=problem.sqrt_s,
        edm=fit.edm,
        n_calls=fit.n_calls,
        start="symbolic-regression constants refitted by Migrad",
        notes=tuple(notes),
    )


def _wrap(
    problem: SpectrumFitProblem, model: SymbolicExpression, constants: npt.ArrayLike
) -> tuple[BackgroundFunction, FloatArray, FloatArray]:
    """Return the wrapped function, its directions T and d ln(sum mu) / du at u = 0."""
    centre = np.asarray(constants, dtype=np.float64).reshape(-1)
    if centre.size != len(model.parameter_names) or not np.all(np.isfinite(centre)):
        raise InvalidInputError(
            f"expression {model.text!r} needs {len(model.parameter_names)} finite constants "
            f"for {model.parameter_names}, found {centre.tolist()}"
        )
    used = problem.used
    nodes, weights = problem.nodes[used], problem.weights[used]
    poisson = _poisson_directions(model, centre, nodes, weights)
    expected = _bin_integrals(model, centre, nodes, weights)

    def log_expected(shift: FloatArray) -> FloatArray:
        with np.errstate(all="ignore"):
            return np.log(_bin_integrals(model, centre + poisson @ shift, nodes, weights))

    # In the Poisson-whitened coordinates the information is the unit matrix; removing the
    # normalisation (profiled by core.fit as p1) leaves the multinomial information, whose
    # eigenvalues lie in [0, 1]: 0 marks the direction that only rescales the spectrum.
    jacobian = _jacobian(log_expected, np.zeros(poisson.shape[1]), step=1e-4)
    if jacobian is None:
        raise FitError(
            f"expression {model.text!r} has non-finite derivatives at the given constants; "
            "it can not be wrapped"
        )
    fractions = expected / expected.sum()
    centred = jacobian - fractions @ jacobian
    information = expected.sum() * centred.T @ (centred * fractions[:, None])
    eigenvalues, eigenvectors = np.linalg.eigh(information)
    keep = eigenvalues > _NORMALISATION_TOLERANCE
    rotation = eigenvectors[:, keep] / np.sqrt(eigenvalues[keep])
    directions = poisson @ rotation
    d_log_norm = fractions @ jacobian @ rotation
    if directions.shape[1] == 0:
        raise FitError(f"no constant of {model.text!r} changes the shape of the spectrum")

    def log_shape(x: FloatArray, theta: FloatArray) -> FloatArray:
        return model.log_density(x, centre + directions @ np.asarray(theta, dtype=np.float64))

    k = directions.shape[1]
    values = ", ".join(
        f"{name}={value:.12g}" for name, value in zip(model.parameter_names, centre, strict=True)
    )
    function = BackgroundFunction(
        name=f"symbolic: {model.text}",
        parameter_names=("p1", *(f"u{index}" for index in range(1, k + 1))),
        formula=f"p1 exp({model.text}) with ({values}) + T u, T the {k} whitened directions",
        start=(0.0,) * k,
        shape=log_shape,
    )
    return function, directions, d_log_norm


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


@dataclass(frozen=True, eq=False)
class SymbolicSearchResult:
    """The chosen expression, its fit and the Pareto front it was chosen from.

    The background density per GeV is f = p1 exp(g(x; c)), with g = `expression` in x, lnx,
    ln1mx, its constants c = `constants` and p1 = fit.parameters[0] (close to 1: g carries
    the normalisation when it has a constant term). `fit` is the core.fit FitResult of the
    wrapped function, ready for the robustness checks.
    """

    expression: str
    constant_names: tuple[str, ...]
    constants: tuple[float, ...]
    fit: FitResult
    candidates: tuple[SymbolicCandidate, ...]
    chosen_index: int
    selection: ParetoSelection
    backend: Literal["pyoperon", "pysr"]
    backend_message: str
    seed: int

    @property
    def formula(self) -> str:
        """Return ln f as text, the fitted numbers in place of the constant names."""
        return substitute_constants(
            f"log({self.fit.parameters[0]!r}) + {self.expression}",
            dict(zip(self.constant_names, self.constants, strict=True)),
        )


def substitute_constants(text: str, constants: Mapping[str, float]) -> str:
    """Write `text` with each named constant replaced by its value (round-trips exactly)."""
    model = parse_expression(text)
    missing = sorted(set(model.parameter_names) - set(constants))
    if missing:
        raise InvalidInputError(f"no values given for the constants {missing} of {text!r}")

    class _Substitute(ast.NodeTransformer):
        def visit_Name(self, node: ast.Name) -> ast.AST:
            if node.id in constants:
                return ast.Constant(value=float(constants[node.id]))
            return node

    tree = _Substitute().visit(_parse_tree(text))
    return ast.unparse(ast.fix_missing_locations(tree))


def _criterion(deviance: float, n_free: int, n_bins: int, selection: ParetoSelection) -> float:
    penalty = math.log(n_bins) if selection == "bic" else 2.0
    return deviance + penalty * n_free


def _check_search_options(
    seed: int, population_size: int, generations: int, max_length: int, selection: str
) -> None:
    if selection not in ("bic", "aic"):
        raise InvalidInputError(f"selection must be 'bic' or 'aic', found {selection!r}")
    for name, value, low in (
        ("population_size", population_size, 10),
        ("generations", generations, 1),
        ("max_length", max_length, 3),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, found {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2^63), found {seed!r}")


def symbolic_fit_problem(
    problem: SpectrumFitProblem,
    *,
    backend: SymbolicBackend = "auto",
    seed: int = 0,
    population_size: int = 300,
    generations: int = 60,
    max_length: int = 25,
    selection: ParetoSelection = "bic",
) -> SymbolicSearchResult:
    """Search ln f(x, ln x, ln(1 - x)) on a prepared spectrum and fit the best Pareto member.

    The search regresses ln(n / width) (per GeV) of the non-empty bins at their centres with
    sigma = 1 / sqrt(n). Every member of its accuracy-complexity front is refitted with the
    Poisson likelihood; the one with the smallest deviance + penalty x free constants wins
    (`selection` 'bic': penalty ln N_bins, 'aic': 2) and is fitted again by core.fit as a
    BackgroundFunction. Seeded and reproducible. Raises FitDidNotConvergeError when no
    member converges.
    """
    _check_search_options(seed, population_size, generations, max_length, selection)
    used = problem.used
    counts = problem.range_counts
    filled = used & (counts > 0)
    if np.count_nonzero(filled) < _MIN_FILLED_BINS:
        raise InvalidInputError(
            f"the fit range has {np.count_nonzero(filled)} non-empty bins in the likelihood; "
            f"a symbolic fit needs at least {_MIN_FILLED_BINS}; widen the range or use an "
            "analytic function"
        )
    chosen_backend, message = resolve_backend(backend)
    range_edges = problem.range_edges
    lower = range_edges[:-1][filled]
    upper = np.minimum(range_edges[1:], problem.sqrt_s)[filled]
    x_centre = 0.5 * (lower + upper) / problem.sqrt_s
    features = np.column_stack([x_centre, np.log(x_centre), np.log1p(-x_centre)])
    target = np.log(counts[filled] / (upper - lower))
    sigma = 1.0 / np.sqrt(counts[filled])
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
    candidates: list[SymbolicCandidate] = []
    fits: list[ExpressionFit | None] = []
    for member in front:
        try:
            expression, starts = lift_constants(member.text)
            fit = refit_expression(problem, expression, starts)
        except (FitError, InvalidInputError) as error:
            candidates.append(
                SymbolicCandidate(
                    member.text, member.complexity, 0, math.inf, 0.0, math.inf, False, str(error)
                )
            )
            fits.append(None)
            continue
        criterion = _criterion(fit.deviance, fit.n_free, problem.n_used, selection)
        candidates.append(
            SymbolicCandidate(
                fit.expression,
                member.complexity,
                fit.n_free,
                fit.deviance,
                fit.p_value,
                criterion,
                True,
                "",
            )
        )
        fits.append(fit)
    ranked = sorted(
        (index for index, fit in enumerate(fits) if fit is not None),
        key=lambda index: candidates[index].criterion,
    )
    failures: list[str] = []
    for index in ranked:
        chosen = fits[index]
        assert chosen is not None
        names, constants = chosen.constant_names, chosen.constants
        notes = [
            f"symbolic regression ({chosen_backend}, seed {seed}, {selection} over "
            f"{len(front)} front members): ln f = ln p1 + {chosen.expression}",
            "constants: "
            + ", ".join(f"{name}={value!r}" for name, value in zip(names, constants, strict=True)),
            message,
        ]
        try:
            result = _fit_result(problem, parse_expression(chosen.expression), chosen, notes)
        except FitError as error:
            failures.append(f"{chosen.expression}: {error}")
            continue
        return SymbolicSearchResult(
            expression=chosen.expression,
            constant_names=names,
            constants=constants,
            fit=result,
            candidates=tuple(candidates),
            chosen_index=index,
            selection=selection,
            backend=chosen_backend,
            backend_message=message,
            seed=seed,
        )
    raise FitDidNotConvergeError(
        f"none of the {len(front)} expressions of the {chosen_backend} Pareto front gave a "
        f"converged Poisson fit ({'; '.join(failures) or 'every refit failed'}); try another "
        "seed or more generations"
    )


def symbolic_fit(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None = None,
    *,
    sqrt_s: float = 13000.0,
    backend: SymbolicBackend = "auto",
    seed: int = 0,
    population_size: int = 300,
    generations: int = 60,
    max_length: int = 25,
    selection: ParetoSelection = "bic",
) -> SymbolicSearchResult:
    """Symbolic-regression background of a spectrum (edges in GeV) over [lo, hi] GeV.

    See core.fit.prepare_spectrum for the fit range and `symbolic_fit_problem` for the rest.
    """
    problem = prepare_spectrum(edges, counts, fit_range, sqrt_s=sqrt_s)
    return symbolic_fit_problem(
        problem,
        backend=backend,
        seed=seed,
        population_size=population_size,
        generations=generations,
        max_length=max_length,
        selection=selection,
    )


def symbolic_fallback(
    *,
    backend: SymbolicBackend = "auto",
    population_size: int = 300,
    generations: int = 60,
    max_length: int = 25,
    selection: ParetoSelection = "bic",
) -> Callable[[SpectrumFitProblem, int], FitResult]:
    """A core.selection Fallback: (prepared spectrum, seed) -> FitResult of the symbolic fit."""

    def fallback(problem: SpectrumFitProblem, seed: int) -> FitResult:
        return symbolic_fit_problem(
            problem,
            backend=backend,
            seed=seed,
            population_size=population_size,
            generations=generations,
            max_length=max_length,
            selection=selection,
        ).fit

    return fallback
