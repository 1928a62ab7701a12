"""Rate at which each background check rejects the truth, on toys independent of the fit code.

Toys: the p4 dijet density f(x) = (1-x)^p2 x^(p3 + p4 ln x), x = m / sqrt_s (13 TeV), is
written here, integrated per bin with scipy.integrate.quad on the scan's resolution binning
(written out here too: e_{k+1} = e_k + e_k sqrt(0.84^2 / e_k + 0.016^2) from 35 GeV),
normalised to N events in [300 GeV, 0.65 sqrt_s] and Poisson-fluctuated with numpy: nothing
is shared with core.fitfunctions / core.fit, so a mistake there cannot hide here. Each toy
goes through `core.background.choose_background` with the scan's defaults (stream start
300 GeV, default `CheckOptions`: goodness of fit `auto`, fit-start stability, Asimov
spurious signal, falling background) and, separately, the checks are run on the p4 fit
(the truth) whatever the nested tests chose. Per size: the rejection rate of the truth
per check, the choice's outcome (function, accepted or not), binomial errors.

Power: the same procedure on toys of p4 times a broad Gaussian bump (`--shape bump`),
where the truth is not in the family.

    nice -n 10 env PYTHONPATH=$PWD .venv/bin/python bench/validate_checks.py \
        [--sizes 1e4 1e5 1e6] [--toys 100] [--shape p4|bump] [--cache FILE]

Per-toy results are cached (runs/validate_checks/validate_checks_toys_<shape>.json) and a rerun
continues from them; the summary goes to bench/results/validate_checks.json and .md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from scipy import integrate

from core.background import CheckOptions, choose_background, run_checks
from core.errors import FitError
from core.fit import fit_spectrum, prepare_spectrum
from core.fitfunctions import get_function

RESULTS = Path(__file__).parent / "results"
CACHE = Path(__file__).parents[1] / "runs" / "validate_checks"
"""Per-toy results (not committed: runs/ is ignored), read back by a rerun."""
SQRT_S = 13000.0
FIT_FROM_GEV = 300.0
UPPER_GEV = 0.65 * SQRT_S
P4_TRUTH = (10.0, -4.0, -0.3)
"""(p2, p3, p4) of the truth, as tests/spectra.py SHAPES["p4"]."""
BUMP = (2000.0, 200.0, 0.002)
"""(mass GeV, sigma GeV, fraction of the events) of the broad bump of the power toys."""
NESTED = ("p2", "p3", "p4", "p5", "p6")


def resolution_edges(start: float = 35.0, stop: float = SQRT_S) -> np.ndarray:
    """The scan's binning, written out: e_{k+1} = e_k + w(e_k) up to the first edge > stop."""
    edges = [start]
    while edges[-1] <= stop:
        mass = edges[-1]
        edges.append(mass + mass * math.sqrt(0.84**2 / mass + 0.016**2))
    return np.array(edges)


def p4_density(mass: float) -> float:
    """The truth's density per GeV, up to normalisation."""
    p2, p3, p4 = P4_TRUTH
    x = mass / SQRT_S
    return float((1.0 - x) ** p2 * x ** (p3 + p4 * math.log(x)))


def bump_density(mass: float) -> float:
    """A Gaussian of unit integral at BUMP's mass and width (per GeV)."""
    centre, sigma, _ = BUMP
    return math.exp(-0.5 * ((mass - centre) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def expected_counts(edges: np.ndarray, n_events: float, shape: str) -> np.ndarray:
    """Exact bin integrals (quad) of the truth, n_events in [FIT_FROM_GEV, UPPER_GEV]."""
    truth = np.array(
        [integrate.quad(p4_density, lo, hi)[0] for lo, hi in itertools.pairwise(edges)]
    )
    inside = (edges[:-1] >= FIT_FROM_GEV - 1e-9) & (edges[1:] <= UPPER_GEV + 1e-9)
    truth *= n_events / truth[inside].sum()
    if shape == "bump":
        bump = np.array(
            [integrate.quad(bump_density, lo, hi)[0] for lo, hi in itertools.pairwise(edges)]
        )
        truth = truth + BUMP[2] * n_events * bump
    return truth


def _report_row(report: Any) -> dict[str, Any]:
    return {
        "passed": bool(report.passed),
        "checks": {check.name: check.status for check in report.checks},
        "numbers": {
            check.name: {key: float(value) for key, value in check.numbers.items()}
            for check in report.checks
        },
    }


def one_toy(edges: np.ndarray, counts: np.ndarray, seed: int) -> dict[str, Any]:
    """The choice with the scan's defaults, and the checks on the p4 fit, for one toy."""
    options = CheckOptions()
    start = time.perf_counter()
    decision = choose_background(
        edges, counts, stream_start_gev=FIT_FROM_GEV, sqrt_s=SQRT_S, options=options, seed=seed
    )
    row: dict[str, Any] = {
        "seed": seed,
        "nested_choice": decision.selection.chosen,
        "chosen": decision.chosen,
        "tests": [
            {"lower": t.lower, "higher": t.higher, "method": t.method, "p": t.p_value}
            for t in decision.selection.tests
        ],
        "candidates": {
            c.name: None if c.report is None else _report_row(c.report) for c in decision.candidates
        },
        "fit_range": None if decision.fit_range is None else list(decision.fit_range.bounds),
    }
    truth_fit = decision.selection.fits.get("p4")
    if truth_fit is None:
        problem = prepare_spectrum(
            edges, counts, None if decision.fit_range is None else decision.fit_range.bounds
        )
        try:
            truth_fit = fit_spectrum(problem, get_function("p4"), seed=seed)
        except FitError as error:
            row["p4_checks"] = {"error": str(error)}
    if truth_fit is not None:
        floor = decision.fit_range.floor_bin if decision.fit_range is not None else None
        report = run_checks(edges, counts, truth_fit, options, seed=seed + 2, floor_bin=floor)
        row["p4_checks"] = _report_row(report)
        row["p4_deviance"] = float(truth_fit.deviance)
    row["seconds"] = time.perf_counter() - start
    return row


def _binomial(k: int, n: int) -> dict[str, float]:
    rate = k / n if n else math.nan
    return {
        "k": k,
        "n": n,
        "rate": rate,
        "error": math.sqrt(rate * (1 - rate) / n) if n else math.nan,
    }


def summarise(rows: list[dict[str, Any]], shape: str) -> dict[str, Any]:
    """Per check the rejection rate of the p4 fit; the choice's outcomes."""
    n = len(rows)
    truth_like = {"p4", "p5", "p6"} if shape == "p4" else set()
    check_names = (
        "goodness_of_fit",
        "fit_start_stability",
        "spurious_signal",
        "falling_background",
    )
    checked = [row["p4_checks"] for row in rows if "checks" in row.get("p4_checks", {})]
    rejection = {
        name: _binomial(sum(1 for c in checked if c["checks"].get(name) == "fail"), len(checked))
        for name in check_names
    }
    rejection["any"] = _binomial(sum(1 for c in checked if not c["passed"]), len(checked))
    not_applicable = {
        name: sum(1 for c in checked if c["checks"].get(name) == "not_applicable")
        for name in check_names
    }
    chosen: dict[str, int] = {}
    for row in rows:
        key = str(row["chosen"])
        chosen[key] = chosen.get(key, 0) + 1
    nested: dict[str, int] = {}
    for row in rows:
        key = str(row["nested_choice"])
        nested[key] = nested.get(key, 0) + 1
    accepted_truth = sum(1 for row in rows if row["chosen"] in truth_like)
    return {
        "n_toys": n,
        "p4_rejected_by": rejection,
        "p4_not_applicable": not_applicable,
        "nested_choice": nested,
        "chosen": chosen,
        "accepted_truth_or_nesting": _binomial(accepted_truth, n),
        "accepted_any": _binomial(sum(1 for row in rows if row["chosen"] is not None), n),
        "mean_seconds": float(np.mean([row["seconds"] for row in rows])) if rows else math.nan,
    }


def run(sizes: list[float], n_toys: int, shape: str, cache: Path, seed: int) -> dict[str, Any]:
    """Toys in order, each cached as soon as it is done; the summary per size."""
    edges = resolution_edges()
    cache.parent.mkdir(parents=True, exist_ok=True)
    stored: dict[str, list[dict[str, Any]]] = (
        json.loads(cache.read_text()) if cache.exists() else {}
    )
    for size in sizes:
        key = f"{size:g}"
        rows = stored.setdefault(key, [])
        mu = expected_counts(edges, size, shape)
        for index in range(len(rows), n_toys):
            rng = np.random.default_rng([seed, int(size), index])
            counts = rng.poisson(mu).astype(np.float64)
            rows.append(one_toy(edges, counts, seed=index))
            cache.write_text(json.dumps(stored))
            print(
                f"{shape} {key} toy {index}: {rows[-1]['chosen']} ({rows[-1]['seconds']:.1f} s)",
                flush=True,
            )
    return {
        key: summarise(rows[:n_toys], shape)
        for key, rows in stored.items()
        if key in {f"{s:g}" for s in sizes}
    }


def main() -> None:
    """Run the campaign and write the summary."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[1e4, 1e5, 1e6])
    parser.add_argument("--toys", type=int, default=100)
    parser.add_argument("--shape", choices=("p4", "bump"), default="p4")
    parser.add_argument("--seed", type=int, default=23)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    cache = args.cache or CACHE / f"validate_checks_toys_{args.shape}{args.tag}.json"
    summary = run(args.sizes, args.toys, args.shape, cache, args.seed)
    out = RESULTS / "validate_checks.json"
    everything = json.loads(out.read_text()) if out.exists() else {}
    everything[f"{args.shape}{args.tag}"] = summary
    out.write_text(json.dumps(everything, indent=1))
    out.with_suffix(".md").write_text(markdown(everything))
    print(markdown({f"{args.shape}{args.tag}": summary}))


def _rate(entry: dict[str, float]) -> str:
    return f"{entry['k']}/{entry['n']} ({100 * entry['rate']:.1f} +- {100 * entry['error']:.1f} %)"


def markdown(everything: dict[str, Any]) -> str:
    """A table per campaign: rejection of the p4 fit per check, and the choice's outcome."""
    lines = [
        "# Background checks on toys independent of the fit code",
        "",
        "bench/validate_checks.py: p4 truth (or p4 + a broad bump, `bump`) integrated with",
        "scipy quad on the scan's binning, fit from 300 GeV to 0.65 sqrt_s, `choose_background`",
        "with the scan's defaults. `_old` is the code before issue 23 part 4, `_new` after.",
        "Rejection of p4 = the checks run on the p4 fit of every toy (whatever was chosen).",
        "`bump`: no function of the family is the truth (accepted p4+ is 0 by definition);",
        "its columns measure power: how often the checks reject, how often a function passes.",
        "",
    ]
    checks = ("goodness_of_fit", "fit_start_stability", "spurious_signal", "falling_background")
    for tag, sizes in everything.items():
        lines += [f"## {tag}", ""]
        lines.append(
            "| events | " + " | ".join(checks) + " | any | spurious n/a | chosen | accepted p4+ "
            "| accepted any |"
        )
        lines.append("|" + " --- |" * (len(checks) + 6))
        for size, row in sizes.items():
            rejected = row["p4_rejected_by"]
            cells = [_rate(rejected[name]) for name in (*checks, "any")]
            chosen = ", ".join(f"{k} {v}" for k, v in sorted(row["chosen"].items()))
            accepted = _rate(row["accepted_truth_or_nesting"])
            accepted_any = _rate(row["accepted_any"])
            skipped = row["p4_not_applicable"]["spurious_signal"]
            lines.append(
                f"| {size} | " + " | ".join(cells) + f" | {skipped} | {chosen} | {accepted} "
                f"| {accepted_any} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
