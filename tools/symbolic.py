"""Tool `symbolic_fit`: the symbolic-regression background of one spectrum (core.symbolic)."""

from __future__ import annotations

from pydantic import Field

from core.symbolic import SymbolicCandidate, symbolic_fit
from tools.common import StrictModel
from tools.fits import FitBackgroundOutput, SpectrumInput, SymbolicSearchSettings, fit_output
from tools.registry import register


class SymbolicFitInput(SpectrumInput, SymbolicSearchSettings):
    """A spectrum, its fit range and the settings of the expression search."""

    seed: int = Field(0, ge=0, lt=2**63)
    n_seeds: int = Field(1, ge=1, le=100, description="searches, seeds derived from `seed`")


class CandidateOutput(StrictModel):
    """One Pareto-front member after its Poisson refit."""

    expression: str
    complexity: int
    n_free: int
    deviance: float | None
    p_value: float
    criterion: float | None
    converged: bool
    reason: str
    seed: int


class SymbolicFitOutput(StrictModel):
    """The chosen expression ln f = ln p1 + g(x, lnx, ln1mx; c), its fit and the front."""

    expression: str
    constants: dict[str, float]
    formula: str
    fit: FitBackgroundOutput
    candidates: list[CandidateOutput]
    chosen_index: int
    selection: str
    backend: str
    backend_message: str
    seed: int
    seeds: list[int]


def _candidate_output(candidate: SymbolicCandidate) -> CandidateOutput:
    finite = candidate.converged
    return CandidateOutput(
        expression=candidate.expression,
        complexity=candidate.complexity,
        n_free=candidate.n_free,
        deviance=candidate.deviance if finite else None,
        p_value=candidate.p_value,
        criterion=candidate.criterion if finite else None,
        converged=candidate.converged,
        reason=candidate.reason,
        seed=candidate.seed,
    )


@register(
    "symbolic_fit",
    "Search a background expression in x, ln x, ln(1-x) (pyoperon or PySR) and refit it.",
    SymbolicFitInput,
    SymbolicFitOutput,
)
def symbolic_fit_tool(arguments: SymbolicFitInput) -> SymbolicFitOutput:
    """Run the seeded search, refit the Pareto front and return the chosen expression."""
    edges, counts, _ = arguments.histogram.arrays()
    result = symbolic_fit(
        edges,
        counts,
        arguments.fit_range,
        sqrt_s=arguments.sqrt_s,
        seed=arguments.seed,
        options=arguments.to_core(),
    )
    return SymbolicFitOutput(
        expression=result.expression,
        constants=dict(zip(result.constant_names, result.constants, strict=True)),
        formula=result.formula,
        fit=fit_output(result.fit),
        candidates=[_candidate_output(candidate) for candidate in result.candidates],
        chosen_index=result.chosen_index,
        selection=result.selection,
        backend=result.backend,
        backend_message=result.backend_message,
        seed=result.seed,
        seeds=list(result.seeds),
    )
