"""One scan rule: the graph's decision on every spectrum equals `core.spectrum.analyse_spectrum`
on the same histogram with the scan's settings (seed, checks, hunt, fallback, min events).

The scan is the signal sample's (X(1500) -> jm, 60 events) at 3 and 0.3 pb: in T2/jm and
T3/jm every unmasked function fails its goodness of fit and the background is chosen with
1445-1565 GeV masked, so the masked path is compared too. The graph refits the accepted
function from its parameters (the tools pass JSON), the library hunts against the fit
itself: local Z agree within 1e-3 (measured: 3e-4).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.scan import ScanConfig, scan_checks, scan_fallback_settings, spectrum_seed
from core.masses import SPECTRUM_NAMES, STREAM_FIT_FROM_GEV
from core.spectrum import SpectrumAnalysis, analyse_spectrum
from tests.agent.conftest import (
    CHEAP,
    Sample,
    assert_no_excess_on_a_failed_background,
    run_cli,
    scan_arguments,
)
from tools.fits import CheckSettings, FallbackSettings, symbolic_fallback
from tools.spectrum import HuntSettings

LIBRARY_STATUS = {
    "excess": ("accepted",),
    "no background": ("no accepted background", "fit failed"),
    "skipped": ("too few events",),
}
"""The graph's status of a spectrum and the library's statuses it stands for."""


@pytest.fixture(scope="module")
def rule_run(signal_sample: Sample, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two AR points (3 and 0.3 pb) of the signal sample, serial."""
    out = tmp_path_factory.mktemp("rule-run") / "run"
    done = run_cli(*scan_arguments(signal_sample, out, *CHEAP, "--executor", "serial"))
    assert done.returncode == 0, done.stderr
    return out


def _library(run: Path, index: int) -> dict[str, SpectrumAnalysis]:
    """analyse_spectrum on every spectrum of the point's NPZ, with the scan's settings."""
    config = ScanConfig.model_validate_json((run / "config.json").read_text())
    checks = CheckSettings(**scan_checks(config)).to_core()
    fallback = symbolic_fallback(FallbackSettings(**scan_fallback_settings(config)))
    hunt = HuntSettings().to_core()
    with np.load(run / "spectra" / f"point-{index:03d}.npz") as data:
        edges, counts = data["edges"], data["counts"]
    return {
        name: analyse_spectrum(
            edges,
            counts[k],
            STREAM_FIT_FROM_GEV[name.split("/", maxsplit=1)[0]],
            checks=checks,
            fallback=fallback,
            hunt=hunt,
            min_events=config.min_events,
            seed=spectrum_seed(config.seed, index, name),
        )
        for k, name in enumerate(SPECTRUM_NAMES)
    }


def _graph(run: Path, index: int) -> dict[str, dict[str, Any]]:
    rows = json.loads((run / "points" / f"point-{index:03d}.json").read_text())["spectra"]
    return {row["spectrum"]: row for row in rows}


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_the_graph_and_the_library_decide_every_spectrum_alike(rule_run: Path, index: int) -> None:
    graph, library = _graph(rule_run, index), _library(rule_run, index)
    masked = []
    for name in SPECTRUM_NAMES:
        row, analysis = graph[name], library[name]
        assert analysis.status in LIBRARY_STATUS[row["status"]], (name, row, analysis.trail)
        if row["status"] != "excess":
            continue
        search = analysis.search
        assert search is not None
        bump = search.bump
        assert row["function"] == search.fit.name, name
        assert row["fit_range"] == pytest.approx(search.fit.fit_range, rel=1e-12), name
        assert row["masked_window_gev"] == (
            None if search.masked_window_gev is None else pytest.approx(search.masked_window_gev)
        ), name
        assert row["mask_from"] == search.mask_from, name
        assert row["window_gev"] == pytest.approx([bump.mass_low, bump.mass_high]), name
        assert row["local_z"] == pytest.approx(bump.local_z, rel=1e-3), name
        assert row["checks_passed"] is True
        if search.mask_from == "choice":
            masked.append(name)
    assert {"T2/jm", "T3/jm"} <= set(masked), masked


@pytest.mark.slow
def test_no_excess_stands_on_a_background_that_failed_its_checks(rule_run: Path) -> None:
    results = json.loads((rule_run / "results.json").read_text())
    assert_no_excess_on_a_failed_background(results)
    masked = [e for e in results["excesses"] if e["background_choice"] == "masked"]
    assert masked, "the injected resonance needed the masked choice"
    for excess in masked:
        assert excess["masked_window_gev"] is not None and excess["mask_from"] == "choice"
        assert excess["fit_p_value"] > 0.05, excess
