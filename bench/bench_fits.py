"""Benchmark the background fits: fits/s of p2..p6 on 178-bin spectra, and the fan-out of
one threshold point (63 spectra x 5 functions) serially versus Ray on local cores.

Run: .venv/bin/python bench/bench_fits.py   (writes bench/results/fits.json)
     .venv/bin/python bench/bench_fits.py choose   (writes bench/results/choose_background.json)

`choose`: `choose_background` with every check (defaults: linearised toy goodness of fit,
spurious signal on Asimov data, stability, falling check) on the 63 spectra of a threshold
point, fit ranges from the streams' starts (~126 bins each from 300 GeV). Baseline in the
same run: the same procedure with the previous settings (100 refitted goodness-of-fit toys,
50 spurious-signal toys). Scan budget: 21 AR points x 63 spectra in under 5 min on 2
cores = 0.45 s per spectrum and core for everything, so the goal is a median well under
0.3 s.
The serial path is the baseline measured in the same process; Ray batches several spectra
per task, one batch per core (ray.init is timed separately: small jobs stay serial).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np

from core.errors import FitError
from core.fit import fit_spectrum, prepare_spectrum
from core.fitfunctions import NESTED_FAMILY, bin_integrals, get_function
from core.masses import mass_bin_edges

RESULTS = Path(__file__).resolve().parent / "results" / "fits.json"
SQRT_S = 13000.0
STREAM_FIT_FROM = (600.0, 300.0, 300.0, 500.0, 300.0, 1500.0, 600.0)
N_PAIRS = 9


def threshold_point(seed: int) -> list[tuple[np.ndarray, np.ndarray, tuple[float, None]]]:
    """63 synthetic spectra (7 streams x 9 pairs): p4/ua2 shapes, 1e3..1e6 events."""
    rng = np.random.default_rng(seed)
    edges = mass_bin_edges()
    spectra = []
    for fit_from in STREAM_FIT_FROM:
        for _ in range(N_PAIRS):
            if rng.random() < 0.5:
                function = get_function("p4")
                params = [1.0, rng.uniform(5, 15), rng.uniform(-5, -3), rng.uniform(-0.4, -0.1)]
            else:
                function = get_function("ua2")
                params = [1.0, rng.uniform(3, 6), rng.uniform(10, 30), rng.uniform(-5, 5)]
            mu = bin_integrals(function, params, edges)
            above = edges[:-1] >= fit_from
            mu *= 10 ** rng.uniform(3, 6) / mu[above].sum()
            counts = rng.poisson(mu).astype(float)
            counts[edges[:-1] >= 0.9 * SQRT_S] = 0.0
            spectra.append((edges, counts, (fit_from, None)))
    return spectra


def fit_chain(spectrum: tuple[np.ndarray, np.ndarray, tuple[float, None]]) -> list[float]:
    """Fit p2..p6 in order (each from the previous one); return their NLLs (NaN if failed)."""
    edges, counts, fit_range = spectrum
    problem = prepare_spectrum(edges, counts, fit_range)
    lower = None
    nlls = []
    for name in NESTED_FAMILY:
        try:
            lower = fit_spectrum(problem, name, lower=lower)
            nlls.append(lower.nll)
        except FitError:
            nlls.append(float("nan"))
    return nlls


def fit_batch(batch: list[tuple[np.ndarray, np.ndarray, tuple[float, None]]]) -> list[list[float]]:
    return [fit_chain(spectrum) for spectrum in batch]


def fits_per_second(
    spectra: list[tuple[np.ndarray, np.ndarray, tuple[float, None]]],
) -> dict[str, float]:
    """Each function alone, started from least squares, over all spectra."""
    problems = [prepare_spectrum(*spectrum[:2], spectrum[2]) for spectrum in spectra]
    rates = {}
    for name in NESTED_FAMILY:
        start = time.perf_counter()
        for problem in problems:
            try:
                fit_spectrum(problem, name)
            except FitError:
                continue
        rates[name] = len(problems) / (time.perf_counter() - start)
    return rates


def choose_background_timing(n_spectra: int = 63, n_baseline: int = 12) -> dict[str, object]:
    """Seconds per `choose_background` call, new defaults against the previous settings."""
    from core.background import CheckOptions, choose_background

    spectra = threshold_point(seed=2)[:n_spectra]
    settings = {
        "defaults": (CheckOptions(), n_spectra),
        "previous (100 refitted GOF toys, 50 spurious toys)": (
            CheckOptions(gof_method="toys", spurious_method="toys"),
            n_baseline,
        ),
    }
    results: dict[str, object] = {}
    subset_times: dict[str, list[float]] = {}
    for label, (options, count) in settings.items():
        times, chosen = [], []
        for index, (edges, counts, fit_range) in enumerate(spectra[:count]):
            started = time.perf_counter()
            decision = choose_background(
                edges, counts, stream_start_gev=fit_range[0], options=options, seed=index
            )
            times.append(time.perf_counter() - started)
            chosen.append(decision.chosen)
        results[label] = {
            "median_s": float(np.median(times)),
            "p90_s": float(np.quantile(times, 0.9)),
            "max_s": float(np.max(times)),
            "total_s": float(np.sum(times)),
            "n_passed": sum(name is not None for name in chosen),
            "n_spectra": count,
        }
        subset_times[label] = times[:n_baseline]
        print(
            f"choose_background, {label}: median {np.median(times):.3f} s, "
            f"p90 {np.quantile(times, 0.9):.3f} s, {results[label]['n_passed']}/"  # type: ignore[index]
            f"{count} with an accepted function"
        )
    baseline = subset_times["previous (100 refitted GOF toys, 50 spurious toys)"]
    new = subset_times["defaults"]
    results["speedup_median"] = float(np.median(baseline) / np.median(new))
    results["speedup_note"] = f"medians over the same first {n_baseline} spectra"
    return results


def main() -> None:
    if sys.argv[1:] == ["choose"]:
        timing = choose_background_timing()
        path = RESULTS.with_name("choose_background.json")
        path.write_text(
            json.dumps(
                {
                    "benchmark": "choose_background with every check",
                    "command": "PYTHONPATH=$PWD .venv/bin/python bench/bench_fits.py choose",
                    "machine": {
                        "cpus": os.cpu_count(),
                        "python": sys.version.split()[0],
                        "load_average": os.getloadavg(),
                    },
                    "goal_median_s": 0.3,
                    "results": timing,
                },
                indent=2,
            )
            + "\n"
        )
        print(f"speedup of the median: {timing['speedup_median']:.1f}x; wrote {path}")
        return
    spectra = threshold_point(seed=1)
    n_cpus = os.cpu_count() or 1
    rates = fits_per_second(spectra)
    print("fits/s on 178-bin spectra:", {name: round(rate, 1) for name, rate in rates.items()})

    import ray

    start = time.perf_counter()
    ray.init(
        num_cpus=n_cpus,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}},
    )
    init_seconds = time.perf_counter() - start
    remote_batch = ray.remote(num_cpus=1)(fit_batch)
    n_batches = 2 * n_cpus
    batches = [spectra[index::n_batches] for index in range(n_batches)]
    ray.get([remote_batch.remote(batch[:1]) for batch in batches])  # warm the workers

    def run_ray() -> list[list[float]]:
        parts = ray.get([remote_batch.remote(batch) for batch in batches])
        merged: list[list[float]] = [[] for _ in spectra]
        for index, part in enumerate(parts):
            for offset, nlls in enumerate(part):
                merged[index + offset * n_batches] = nlls
        return merged

    # serial and Ray runs alternate, so that load from other jobs hits both alike
    repeats = 5
    serial_times, ray_times = [], []
    serial_nlls: list[list[float]] = []
    ray_nlls: list[list[float]] = []
    for _ in range(repeats):
        start = time.perf_counter()
        serial_nlls = fit_batch(spectra)
        serial_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        ray_nlls = run_ray()
        ray_times.append(time.perf_counter() - start)
    ray.shutdown()
    serial_seconds, ray_seconds = min(serial_times), min(ray_times)
    same = bool(np.allclose(np.array(serial_nlls), np.array(ray_nlls), equal_nan=True))
    speedup = serial_seconds / ray_seconds
    median_speedup = float(np.median(serial_times) / np.median(ray_times))
    print(f"serial: {len(spectra)} spectra x 5 functions: best {serial_seconds:.2f} s")
    print(f"ray: best {ray_seconds:.2f} s on {n_cpus} cores, {n_batches} batches")
    print(f"speedup {speedup:.2f}x (median {median_speedup:.2f}x); ray.init {init_seconds:.1f} s")
    print(f"same results: {same}")
    failures = int(np.isnan(np.array(serial_nlls)).sum())

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "fits",
                "command": ".venv/bin/python bench/bench_fits.py",
                "machine": {
                    "cpus": n_cpus,
                    "python": sys.version.split()[0],
                    "platform": platform.platform(),
                    "load_average": os.getloadavg(),
                },
                "n_bins": 178,
                "n_spectra": len(spectra),
                "functions": list(NESTED_FAMILY),
                "fits_per_second": rates,
                "serial_seconds": serial_seconds,
                "ray_seconds": ray_seconds,
                "ray_speedup": speedup,
                "ray_median_speedup": median_speedup,
                "ray_goal": 1.7,
                "ray_batches": n_batches,
                "ray_init_seconds": init_seconds,
                "repeats": repeats,
                "serial_seconds_all": serial_times,
                "ray_seconds_all": ray_times,
                "failed_fits": failures,
                "ray_matches_serial": same,
                "note": "2 cores shared with other jobs; serial and Ray runs alternate; best of 5",
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
