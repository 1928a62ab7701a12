"""Symbolic-regression fallback for background fits when no analytic function describes a spectrum.

The search (PHYSICS.md section 5) models g = ln f, the logarithm of the background density per
GeV, as an expression in the features x = m / sqrt_s, ``lnx`` = ln x and ``ln1mx`` = ln(1 - x).
It regresses ln(n / width) of the non-empty bins with Poisson weights (sigma_i = 1 / sqrt(n_i)),
keeps the whole accuracy-complexity Pareto front of the search, refits the constants of every
front member with core.fit (the extended binned Poisson likelihood of every background fit;
expected counts are the Gauss-Legendre integrals of f over the bins) and chooses, among the
members that pass the goodness of fit, the one with the smallest penalised deviance (BIC by
default: D + k ln N_bins, k free parameters). Several seeded searches may be pooled.

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
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt

from core.background import FallbackFit
from core.errors import FitDidNotConvergeError, FitError, InvalidInputError
from core.fit import FitResult, SpectrumFitProblem, fit_spectrum, prepare_spectrum
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
_MIN_FILLED_BINS: Final = 8
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


def _checked_constants(model: SymbolicExpression, values: npt.ArrayLike) -> FloatArray:
    constants = np.asarray(values, dtype=np.float64).reshape(-1)
    if constants.size != len(model.parameter_names) or not np.all(np.isfinite(constants)):
        raise InvalidInputError(
            f"expression {model.text!r} needs {len(model.parameter_names)} finite start values "
            f"for {model.parameter_names}, found {constants.tolist()}"
        )
    return constants


def symbolic_background(
    expression: SymbolicExpression | str, constants: npt.ArrayLike
) -> BackgroundFunction:
    """Wrap ln f = ln p1 + g(x; c) as a core.fit BackgroundFunction whose parameters are c.

    `constants` become its start values. core.fit fits it like any shape; a constant that
    only rescales f (a constant term of g next to p1) is found redundant there and held.
    """
    model = parse_expression(expression) if isinstance(expression, str) else expression
    values = _checked_constants(model, constants)
    if not model.parameter_names:
        raise InvalidInputError(
            f"expression {model.text!r} has no named constants c0, c1, ... to fit"
        )
    return BackgroundFunction(
        name=f"symbolic: {model.text}",
        parameter_names=("p1", *model.parameter_names),
        formula=f"p1 exp({model.text})",
        start=tuple(float(value) for value in values),
        shape=model.log_density,
        expression=model.text,
    )


def refit_expression(
    problem: SpectrumFitProblem,
    expression: SymbolicExpression | str,
    start_values: npt.ArrayLike,
) -> FitResult:
    """Fit the constants of ln f = ln p1 + `expression` to a prepared spectrum (core.fit).

    The extended binned Poisson likelihood of `core.fit.fit_spectrum`, from `start_values`:
    information-whitened Levenberg-Marquardt pre-fit, Migrad and an accurate Hesse. The
    parameters are (ln p1, c0, c1, ...). Raises FitDidNotConvergeError otherwise.
    """
    function = symbolic_background(expression, start_values)
    return fit_spectrum(problem, function, starts=[(0.0, *function.start)], max_attempts=2)


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


@dataclass(frozen=True)
class _RegressionData:
    """Features (x, ln x, ln(1 - x)), target ln(n / width) and sigma 1 / sqrt(n) per bin."""

    features: FloatArray
    target: FloatArray
    sigma: FloatArray


def _search_pyoperon(
    data: _RegressionData, seed: int, options: SearchOptions
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
        uncertainty=[float(value) for value in data.sigma],
        population_size=options.population_size,
        generations=options.generations,
        max_length=options.max_length,
        max_evaluations=10**7,
        optimizer_iterations=10,
        random_state=seed,
        n_threads=1,
    )
    try:
        regressor.fit(data.features, data.target)
    except ValueError as error:
        raise FitError(
            f"the pyoperon search (seed {seed}) failed on this spectrum: {error}; its models "
            "predict non-finite densities here, so use an analytic function or another seed"
        ) from error
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
    data: _RegressionData, seed: int, options: SearchOptions
) -> list[_FrontMember]:
    """Run PySR (deterministic, serial) with weights 1 / sigma^2; return its Pareto front."""
    import pysr

    regressor = pysr.PySRRegressor(
        binary_operators=["+", "-", "*", "/"],
        unary_operators=["exp", "log"],
        niterations=options.generations,
        population_size=options.population_size,
        maxsize=options.max_length,
        random_state=seed,
        deterministic=True,
        parallelism="serial",
        progress=False,
        verbosity=0,
    )
    regressor.fit(
        data.features,
        data.target,
        weights=1.0 / data.sigma**2,
        variable_names=list(FEATURE_NAMES),
    )
    equations = regressor.equations_
    return [
        _FrontMember(text=str(row["equation"]), complexity=int(row["complexity"]))
        for _, row in equations.iterrows()
    ]


# --------------------------------------------------------------------------- the fallback


@dataclass(frozen=True)
class SymbolicCandidate:
    """One member of a search's Pareto front after its Poisson refit (for the audit log).

    `n_free` counts the parameters the data determine, p1 included; `seed` is the seed of
    the search that found it.
    """

    expression: str
    complexity: int
    n_free: int
    deviance: float
    p_value: float
    criterion: float
    converged: bool
    reason: str
    seed: int = 0


@dataclass(frozen=True, eq=False)
class SymbolicSearchResult:
    """The chosen expression, its fit and the Pareto fronts it was chosen from.

    The background density per GeV is f = p1 exp(g(x; c)), with g = `expression` in x, lnx,
    ln1mx, its constants c = `constants` (= fit.parameters[1:]) and ln p1 =
    fit.parameters[0]. `fit` is a core.fit FitResult, ready for the robustness checks.
    `seed` found the chosen expression among the searches of `seeds`; `runners_up` are the
    fits of other expressions that pass the goodness of fit, best first.
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
    seeds: tuple[int, ...] = ()
    runners_up: tuple[FitResult, ...] = ()

    @property
    def formula(self) -> str:
        """Return ln f as text, the fitted numbers in place of the constant names."""
        return fitted_formula(self.fit)


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


def fitted_formula(fit: FitResult) -> str:
    """Write ln f (f per GeV) of a symbolic fit as text with its numbers, ln p1 included."""
    expression = fit.function.expression
    if expression is None:
        raise InvalidInputError(f"{fit.name} is not a symbolic-regression expression")
    names = fit.function.parameter_names[1:]
    return substitute_constants(
        f"{fit.parameters[0]!r} + ({expression})",
        dict(zip(names, fit.parameters[1:], strict=True)),
    )


def _criterion(deviance: float, n_free: int, n_bins: int, selection: ParetoSelection) -> float:
    penalty = math.log(n_bins) if selection == "bic" else 2.0
    return deviance + penalty * n_free


@dataclass(frozen=True)
class SearchOptions:
    """Settings of the symbolic-regression search, its time budget (s) and Pareto choice.

    `n_seeds` searches run (a new one starts only while `time_budget_s` seconds have not
    passed, None: no limit); `alpha` is the goodness-of-fit p-value an expression must
    exceed to be preferred; `selection` 'bic' penalises ln N_bins, 'aic' 2 per free
    parameter. `max_passing`: stop refitting front members (simplest first) and starting
    searches once this many pass the goodness of fit (None: refit every member). Checked
    when a search runs.
    """

    backend: SymbolicBackend = "auto"
    n_seeds: int = 1
    time_budget_s: float | None = None
    alpha: float = 0.05
    population_size: int = 300
    generations: int = 60
    max_length: int = 25
    selection: ParetoSelection = "bic"
    max_passing: int | None = None


FALLBACK_SEARCH: Final = SearchOptions(n_seeds=3, time_budget_s=120.0, max_passing=3)
"""Search options of `symbolic_fallback` by default: up to 3 seeded searches within 120 s,
stopping once 3 front members (the choice and 2 rivals for the spurious-signal test) pass
the goodness of fit. The Poisson refits of the front members, not the search, dominate the
cost (bench/bench_symbolic.py), so members are refitted from the simplest up and no further
search starts once 3 pass: a fallback that succeeds takes a few seconds."""


def _check_search_options(seed: int, options: SearchOptions) -> None:
    if options.selection not in ("bic", "aic"):
        raise InvalidInputError(f"selection must be 'bic' or 'aic', found {options.selection!r}")
    for name, value, low in (
        ("population_size", options.population_size, 10),
        ("generations", options.generations, 1),
        ("max_length", options.max_length, 3),
        ("n_seeds", options.n_seeds, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InvalidInputError(f"{name} must be an integer >= {low}, found {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
        raise InvalidInputError(f"seed must be an integer in [0, 2^63), found {seed!r}")
    time_budget_s = options.time_budget_s
    if time_budget_s is not None and not (math.isfinite(time_budget_s) and time_budget_s > 0):
        raise InvalidInputError(
            f"time_budget_s must be a positive number of seconds or None, found {time_budget_s}"
        )
    if not 0 < options.alpha < 1:
        raise InvalidInputError(f"alpha must lie in (0, 1), found {options.alpha}")
    passing = options.max_passing
    if passing is not None and (
        isinstance(passing, bool) or not isinstance(passing, int) or passing < 1
    ):
        raise InvalidInputError(f"max_passing must be an integer >= 1 or None, found {passing!r}")


def search_seeds(seed: int, n_seeds: int) -> tuple[int, ...]:
    """Seeds of `n_seeds` searches: `seed` itself, then seeds derived from it (reproducible)."""
    derived = np.random.SeedSequence(seed).generate_state(max(n_seeds - 1, 0), dtype=np.uint32)
    return (seed, *(int(value) for value in derived))


def symbolic_fit_problem(
    problem: SpectrumFitProblem, *, seed: int = 0, options: SearchOptions | None = None
) -> SymbolicSearchResult:
    """Search ln f(x, ln x, ln(1 - x)) on a prepared spectrum and fit the best Pareto member.

    Each search regresses ln(n / width) (per GeV) of the non-empty bins at their centres
    with sigma = 1 / sqrt(n). `options.n_seeds` searches run (seeds from `search_seeds`; a
    new one starts only while `options.time_budget_s` seconds have not passed). Every
    member of their accuracy-complexity fronts is refitted by core.fit with the Poisson
    likelihood; among those whose deviance p-value exceeds `options.alpha` the one with the
    smallest deviance + penalty x free parameters wins (`options.selection` 'bic': penalty
    ln N_bins, 'aic': 2), or among all converged members when none passes. Seeded and
    reproducible when every search runs. Raises FitDidNotConvergeError when no member
    converges.
    """
    settings = options or SearchOptions()
    _check_search_options(seed, settings)
    data = _regression_data(problem)
    chosen_backend, message = resolve_backend(settings.backend)
    search = _search_pysr if chosen_backend == "pysr" else _search_pyoperon
    started = time.perf_counter()
    tried: list[int] = []
    refits = _FrontRefits()
    search_failures: list[str] = []
    for search_seed in search_seeds(seed, settings.n_seeds):
        elapsed = time.perf_counter() - started
        if tried and settings.time_budget_s is not None and elapsed > settings.time_budget_s:
            break
        if refits.enough(settings.max_passing):
            break
        tried.append(search_seed)
        try:
            front = search(data, search_seed, settings)
        except FitError as error:
            search_failures.append(str(error))
            continue
        refits.add_front(problem, front, search_seed, settings)
    return _search_result(refits, settings, chosen_backend, message, tried, search_failures)


def _regression_data(problem: SpectrumFitProblem) -> _RegressionData:
    """The regression data of the filled bins in the likelihood (centres x, per GeV)."""
    used = problem.used
    counts = problem.range_counts
    filled = used & (counts > 0)
    if np.count_nonzero(filled) < _MIN_FILLED_BINS:
        raise InvalidInputError(
            f"the fit range has {np.count_nonzero(filled)} non-empty bins in the likelihood; "
            f"a symbolic fit needs at least {_MIN_FILLED_BINS}; widen the range or use an "
            "analytic function"
        )
    range_edges = problem.range_edges
    lower = range_edges[:-1][filled]
    upper = np.minimum(range_edges[1:], problem.sqrt_s)[filled]
    x_centre = 0.5 * (lower + upper) / problem.sqrt_s
    features = np.column_stack([x_centre, np.log(x_centre), np.log1p(-x_centre)])
    target = np.log(counts[filled] / (upper - lower))
    sigma = 1.0 / np.sqrt(counts[filled])
    return _RegressionData(features, target, sigma)


@dataclass
class _FrontRefits:
    """Every distinct front member refitted so far: its row, its fit (None: failed)."""

    candidates: list[SymbolicCandidate] = field(default_factory=list)
    fits: list[FitResult | None] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)
    n_passing: int = 0

    def enough(self, max_passing: int | None) -> bool:
        """True once `max_passing` refits pass the goodness of fit."""
        return max_passing is not None and self.n_passing >= max_passing

    def add_front(
        self,
        problem: SpectrumFitProblem,
        front: Sequence[_FrontMember],
        search_seed: int,
        settings: SearchOptions,
    ) -> None:
        """Refit the members of one front from the simplest up (each expression once)."""
        for member in sorted(front, key=lambda item: item.complexity):
            if self.enough(settings.max_passing):
                break
            try:
                expression, starts = lift_constants(member.text)
                if expression.text in self.seen:
                    continue
                self.seen.add(expression.text)
                fit = refit_expression(problem, expression, starts)
            except (FitError, InvalidInputError) as error:
                self.candidates.append(
                    SymbolicCandidate(
                        member.text,
                        member.complexity,
                        0,
                        math.inf,
                        0.0,
                        math.inf,
                        False,
                        str(error),
                        search_seed,
                    )
                )
                self.fits.append(None)
                continue
            criterion = _criterion(fit.deviance, fit.n_free, problem.n_used, settings.selection)
            self.candidates.append(
                SymbolicCandidate(
                    expression.text,
                    member.complexity,
                    fit.n_free,
                    fit.deviance,
                    fit.p_value,
                    criterion,
                    True,
                    "",
                    search_seed,
                )
            )
            self.fits.append(fit)
            self.n_passing += int(fit.p_value > settings.alpha)


def _search_result(
    refits: _FrontRefits,
    settings: SearchOptions,
    chosen_backend: Literal["pyoperon", "pysr"],
    message: str,
    tried: list[int],
    search_failures: list[str],
) -> SymbolicSearchResult:
    """The best refit (passing ones first, then by criterion) with its notes and rivals."""
    alpha, selection = settings.alpha, settings.selection
    candidates, fits = refits.candidates, refits.fits
    ranked = sorted(
        (index for index, fit in enumerate(fits) if fit is not None),
        key=lambda index: (candidates[index].p_value <= alpha, candidates[index].criterion),
    )
    if not ranked:
        failed = f"; failed searches: {'; '.join(search_failures)}" if search_failures else ""
        raise FitDidNotConvergeError(
            f"none of the {len(candidates)} expressions of the {chosen_backend} Pareto fronts "
            f"(seeds {tried}) gave a converged Poisson fit; try other seeds or more "
            f"generations{failed}"
        )
    chosen_index = ranked[0]
    chosen = fits[chosen_index]
    assert chosen is not None
    n_passing = sum(candidates[index].p_value > alpha for index in ranked)
    summary = (
        f"symbolic regression ({chosen_backend}, seeds {tried}, {selection} over "
        f"{len(candidates)} front members, {n_passing} with p > {alpha}): ln f = ln p1 + "
        f"{chosen.function.expression} (seed {candidates[chosen_index].seed})"
    )
    notes = (
        summary,
        "constants: "
        + ", ".join(
            f"{name}={value!r}"
            for name, value in zip(chosen.function.vector_names, chosen.parameters, strict=True)
        ),
        message,
    )
    runners_up = tuple(
        runner
        for index in ranked[1:]
        if candidates[index].p_value > alpha and (runner := fits[index]) is not None
    )
    return SymbolicSearchResult(
        expression=candidates[chosen_index].expression,
        constant_names=chosen.function.parameter_names[1:],
        constants=chosen.parameters[1:],
        fit=replace(chosen, notes=(*notes, *chosen.notes)),
        candidates=tuple(candidates),
        chosen_index=chosen_index,
        selection=selection,
        backend=chosen_backend,
        backend_message=message,
        seed=candidates[chosen_index].seed,
        seeds=tuple(tried),
        runners_up=runners_up,
    )


def symbolic_fit(
    edges: npt.ArrayLike,
    counts: npt.ArrayLike,
    fit_range: tuple[float, float | None] | None = None,
    *,
    sqrt_s: float = 13000.0,
    seed: int = 0,
    options: SearchOptions | None = None,
) -> SymbolicSearchResult:
    """Symbolic-regression background of a spectrum (edges in GeV) over [lo, hi] GeV.

    See core.fit.prepare_spectrum for the fit range and `symbolic_fit_problem` for the rest.
    """
    problem = prepare_spectrum(edges, counts, fit_range, sqrt_s=sqrt_s)
    return symbolic_fit_problem(problem, seed=seed, options=options)


def symbolic_fallback(
    options: SearchOptions = FALLBACK_SEARCH, *, n_alternatives: int = 2
) -> Callable[[SpectrumFitProblem, int], FallbackFit]:
    """A core.background Fallback: (prepared spectrum, seed) -> the symbolic fit and its rivals.

    Runs `symbolic_fit_problem` with `options.n_seeds` searches derived from the seed
    (within `options.time_budget_s`) and keeps the best expression that passes the goodness
    of fit. The next `n_alternatives` passing expressions are handed to the spurious-signal
    test as alternative shapes: no analytic family describes a spectrum that needs this
    fallback.
    """
    if (
        isinstance(n_alternatives, bool)
        or not isinstance(n_alternatives, int)
        or n_alternatives < 0
    ):
        raise InvalidInputError(f"n_alternatives must be an integer >= 0, found {n_alternatives!r}")

    def fallback(problem: SpectrumFitProblem, seed: int) -> FallbackFit:
        result = symbolic_fit_problem(problem, seed=seed, options=options)
        alternatives = tuple(
            replace(fit.function, start=tuple(float(value) for value in fit.parameters[1:]))
            for fit in result.runners_up[:n_alternatives]
        )
        notes = (
            result.fit.notes[0],
            f"fitted: ln f = {result.formula}, deviance {result.fit.deviance:.1f} for "
            f"{result.fit.ndf} degrees of freedom, p = {result.fit.p_value:.3g}",
            "alternatives for the spurious-signal test: "
            + (", ".join(function.name for function in alternatives) or "none passes"),
        )
        return FallbackFit(result.fit, alternatives, notes)

    return fallback
