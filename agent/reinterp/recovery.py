"""The three recoveries of an injected signal in one spectrum at one AR point (any worker).

Each fits a Gaussian of fixed mass and width with free yield; pull = (fitted - expected) /
fit error against the expected yield:
- `signal_yield`/`pull` ("rule rerun"): the scan's rule run again on the injected spectrum
  (`ScanRule`, agent/reinterp/rule.py: background choice, checks, bump hunt, window
  exclusion; no symbolic fallback), then background (the chosen function, floating) +
  Gaussian. Defined only when the rule accepts a background, which it does less often with
  more signal: these pulls are conditional on acceptance (`accepted_fraction` of the toys).
- `run_function_*`: the function the run accepted for that spectrum and point refitted to
  the injected spectrum (start: the run's parameters; no new choice), then the same fit; for
  a spectrum whose background the run found only after excluding its excess window, the
  final function of points/point-NNN.json (no start parameters).
- `fixed_shape_*`: the Gaussian over the run's own background prediction, its shape fixed
  and normalisation free (made before the injection: cannot absorb the signal; with
  `background="fit"` the toys are drawn from it, so this is the reference).

A job holds everything its analysis needs, so serial and Ray runs give the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from agent.reinterp.rule import ScanRule
from core.errors import AnomscanError
from core.fit import fit_background
from core.fitfunctions import FUNCTIONS
from core.reinterp import fit_injected_signal
from core.significance import signal_fit

FloatArray = npt.NDArray[np.float64]

RULE_NOT_RERUN = "rule not rerun"
"""The status of a toy beyond --rule-toys: its spectrum is only refitted (no rule rerun)."""


@dataclass(frozen=True)
class InjectedSpectrumJob:
    """One injected spectrum at one AR point, analysed with the scan's rule (any worker)."""

    name: str
    edges: FloatArray
    counts: FloatArray
    point_pb: float
    seed: int
    mass: float
    sigma: float
    rule: ScanRule
    whole_stream: bool
    run_background: dict[str, Any] | None = None
    """The run's accepted background of this spectrum at this point (function, fit_range)."""
    run_expected: FloatArray | None = None
    """The run's final expected background per bin (0 outside its fit range), if accepted."""
    rerun_rule: bool = True
    """Whether the scan's rule runs again here (else only the two fixed recoveries)."""


def _fixed_shape_fit(job: InjectedSpectrumJob) -> dict[str, Any]:
    """The yield over the run's own background prediction (shape fixed, normalisation free).

    The run fitted its background before anything was injected, so this recovery is free of
    the background absorbing the signal: the reference of the injection test.
    """
    if job.run_expected is None:
        return {"fixed_shape_status": "the run accepted no background here"}
    inside = np.flatnonzero(job.run_expected > 0)
    first, stop = int(inside[0]), int(inside[-1]) + 1
    try:
        fit = signal_fit(
            job.counts[first:stop],
            job.run_expected[first:stop],
            job.edges[first : stop + 1],
            job.mass,
            job.sigma,
            background_normalisation="floating",
        )
    except AnomscanError as error:
        return {"fixed_shape_status": f"fit failed: {str(error).splitlines()[0]}"}
    return {
        "fixed_shape_status": "fitted",
        "fixed_shape_yield": fit.signal_yield,
        "fixed_shape_yield_error": fit.signal_yield_error,
        "fixed_shape_local_z": fit.local_z,
    }


def _fixed_function_fit(job: InjectedSpectrumJob) -> dict[str, Any]:
    """The yield with the run's own accepted function refitted (no new choice): every toy."""
    entry = job.run_background
    if entry is None:
        return {"run_function_status": "the run accepted no background here"}
    if entry["name"] not in FUNCTIONS:
        return {"run_function_status": f"symbolic background {entry['function']!r}: not refitted"}
    try:
        fit = fit_background(
            job.edges,
            job.counts,
            entry["name"],
            tuple(entry["fit_range"]),
            starts=None if entry["parameters"] is None else [entry["parameters"]],
            seed=job.seed,
        )
        recovered = fit_injected_signal(job.edges, job.counts, fit, job.mass, job.sigma)
    except AnomscanError as error:
        return {"run_function_status": f"fit failed: {str(error).splitlines()[0]}"}
    return {
        "run_function_status": "fitted",
        "run_function": entry["name"],
        "run_function_yield": recovered.signal_yield,
        "run_function_yield_error": recovered.signal_yield_error,
        "run_function_local_z": recovered.local_z,
    }


def analyse_injected(job: InjectedSpectrumJob) -> dict[str, Any]:
    """Background choice + bump hunt (the scan's rule), then the background + Gaussian fit.

    Also the same Gaussian fit on the run's own accepted function (refitted to the injected
    spectrum, no new choice): the rule's checks reject more often the toys with more signal,
    so its yields are conditional on acceptance, the fixed function's are not.
    """
    fixed = _fixed_function_fit(job) | _fixed_shape_fit(job)
    if not job.rerun_rule:
        return {
            "status": RULE_NOT_RERUN,
            "reason": "the rule runs in the first --rule-toys toys",
        } | fixed
    result = job.rule.analyse(job.name, job.edges, job.counts, job.seed)
    row: dict[str, Any] = {"status": result.status, "reason": result.reason, **fixed}
    if result.status != "accepted" or result.search is None:
        return row
    bump = result.search.bump
    row.update(
        function=result.search.function,
        window_gev=[bump.mass_low, bump.mass_high],
        bump_local_z=bump.local_z,
        bump_global_p=bump.global_p,
    )
    try:
        fit = fit_injected_signal(job.edges, job.counts, result.search.fit, job.mass, job.sigma)
    except AnomscanError as error:
        row["fit_error"] = str(error).splitlines()[0]
        return row
    row.update(
        signal_yield=fit.signal_yield,
        signal_yield_error=fit.signal_yield_error,
        local_z=fit.local_z,
        fraction_in_range=fit.fraction_in_range,
    )
    return row


def with_pulls(row: dict[str, Any]) -> dict[str, Any]:
    """Bias and pull against the expected yield for each recovery the row holds."""
    for prefix, yield_key in (
        ("", "signal_yield"),
        ("fixed_shape_", "fixed_shape_yield"),
        ("run_function_", "run_function_yield"),
    ):
        if yield_key in row:
            bias = row[yield_key] - row["expected_yield"]
            row[f"{prefix}bias"] = bias
            row[f"{prefix}pull"] = bias / row[f"{yield_key}_error"]
    return row
