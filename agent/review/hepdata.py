"""`anomscan export RUN --hepdata DIR`: a HEPData submission (hepdata_lib, extra `review`).

Tables: for every flagged excess (`agent.review.run.flagged_excesses`: a spectrum x AR point
where the scan triggered a window exclusion, or the scan-wide largest excess) the
observed counts per mass bin with Poisson errors and the accepted background in the fit
range; then the significance map (local Z per spectrum x AR point, empty where no
background was accepted). Numbers are those of the run folder (points/point-NNN.npz,
results.json), unchanged.
"""

from __future__ import annotations

import contextlib
import itertools
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy.stats import chi2

from agent.review.run import RunRecord, flagged_excesses, load_run, spectrum_slug
from core.errors import AnomscanError, InvalidInputError
from core.files import atomic_path
from core.masses import SPECTRUM_NAMES


@dataclass(frozen=True)
class HepdataOutcome:
    """Where the submission went."""

    submission: Path
    n_tables: int


def garwood_errors(counts: np.ndarray) -> list[tuple[float, float]]:
    """(-down, +up) of the central 68.27 % Poisson interval of each count (Garwood 1936)."""
    n = np.asarray(counts, dtype=float)
    with np.errstate(invalid="ignore"):
        low = np.where(n > 0, chi2.ppf(0.158655, 2 * n) / 2, 0.0)
    high = chi2.ppf(0.841345, 2 * n + 2) / 2
    return [(float(lo - k), float(hi - k)) for k, lo, hi in zip(n, low, high, strict=True)]


def _excess_table(run: RunRecord, excess: dict[str, Any]) -> Any:
    """The observed counts (Poisson errors) and accepted background of one flagged excess.

    None when the point has no background arrays (a run from before they were written).
    """
    from hepdata_lib import Table, Uncertainty, Variable

    index = run.point_index(excess["xsec_pb"])
    point = run.points[index]
    if "background" not in point:
        return None
    k = SPECTRUM_NAMES.index(excess["spectrum"])
    summary = next(s for s in point["summary"]["spectra"] if s["spectrum"] == excess["spectrum"])
    first, stop = summary["bins"]
    edges = point["edges"][first : stop + 1]
    counts = point["counts"][k][first:stop]
    background = point["background"][k][first:stop]
    table = Table(spectrum_slug(excess["spectrum"], index))
    low, high = excess["window_gev"]
    table.description = (
        f"Spectrum {excess['spectrum']} in the anomaly region of {excess['xsec_pb']:.4g} pb: "
        f"observed events and the accepted background ({excess['function']}). BumpHunter "
        f"window {low:.1f}-{high:.1f} GeV, local Z {excess['local_z']:.3f}."
    )
    table.location = "anomscan report, spectrum page"
    table.keywords["observables"] = ["N"]
    mass = Variable("invariant mass", is_independent=True, is_binned=True, units="GeV")
    mass.values = [(float(a), float(b)) for a, b in itertools.pairwise(edges)]
    observed = Variable("observed events", is_independent=False, is_binned=False, units="")
    observed.values = [float(c) for c in counts]
    poisson = Uncertainty("Poisson 68% (Garwood)", is_symmetric=False)
    poisson.values = garwood_errors(counts)
    observed.add_uncertainty(poisson)
    expected = Variable(
        "background",
        is_independent=False,
        is_binned=False,
        units="",
        zero_uncertainties_warning=False,
    )
    expected.values = [float(b) for b in background]
    expected.digits = 12  # hepdata_lib rounds to 5 significant digits by default
    if "background_error" in point:
        fit_band = Uncertainty("fit uncertainty (1 sigma, covariance propagated)")
        fit_band.values = [float(e) for e in point["background_error"][k][first:stop]]
        expected.add_uncertainty(fit_band)
    for variable in (mass, observed, expected):
        table.add_variable(variable)
    return table


def _significance_map_table(run: RunRecord) -> Any:
    """Local Z per spectrum x AR point ('-' where skipped or no background passed)."""
    from hepdata_lib import Table, Variable

    local_z = []
    spectrum_index = []
    point_values = []
    for i, point in enumerate(run.points):
        entries = {s["spectrum"]: s for s in (point["summary"] or {"spectra": []})["spectra"]}
        for j, name in enumerate(SPECTRUM_NAMES):
            entry = entries.get(name, {})
            spectrum_index.append(float(j))
            point_values.append(float(run.results["points_pb"][i]))
            value = entry.get("local_z") if entry.get("status") == "excess" else None
            local_z.append("-" if value is None else float(value))
    table = Table("significance map")
    table.description = (
        "Local Z of the largest BumpHunter excess per spectrum (index into the 63 spectra, "
        f"in the order {', '.join(SPECTRUM_NAMES[:3])}, ..., {SPECTRUM_NAMES[-1]}) and "
        "anomaly-region point; '-' where the spectrum was skipped or no background passed."
    )
    table.location = "anomscan report, significance map"
    table.keywords["observables"] = ["SIG"]
    spectrum_variable = Variable("spectrum index", is_independent=True, is_binned=False)
    spectrum_variable.values = spectrum_index
    point_variable = Variable(
        "anomaly-region cross-section", is_independent=True, is_binned=False, units="pb"
    )
    point_variable.values = point_values
    z_variable = Variable("local Z", is_independent=False, is_binned=False)
    z_variable.values = local_z
    z_variable.digits = 12
    for variable in (spectrum_variable, point_variable, z_variable):
        table.add_variable(variable)
    return table


def _write_submission(submission: Any, output: Path) -> None:
    """DIR/*.yaml (stale ones removed) and DIR.tar.gz beside it, validated by hepdata_lib."""
    output = output.resolve()  # the archive is moved from a scratch working directory
    try:
        output.mkdir(parents=True, exist_ok=True)
        for stale in output.glob("*.yaml"):
            stale.unlink()
        archive = output.with_name(f"{output.name}.tar.gz")
        # hepdata_lib writes (and validates) its tarball in the working directory; DIR
        # itself must hold only the YAML files the submission references
        with tempfile.TemporaryDirectory() as scratch, contextlib.chdir(scratch):
            submission.create_files(str(output), validate=True, remove_old=False)
            with atomic_path(archive, what="HEPData archive") as temporary:
                shutil.move(Path(scratch) / "submission.tar.gz", temporary)
    except OSError as error:
        raise InvalidInputError(
            f"cannot write the HEPData folder {output}: {error.strerror}; give a writable DIR"
        ) from error
    except (AssertionError, ValueError, RuntimeError) as error:
        raise AnomscanError(f"hepdata_lib refused the submission: {error}") from error


def export_hepdata(run_dir: Path, output: Path) -> HepdataOutcome:
    """Write DIR/submission.yaml and one YAML per table, and DIR.tar.gz beside DIR (validated)."""
    try:
        from hepdata_lib import Submission
    except ImportError as error:
        raise InvalidInputError(
            "the HEPData export needs hepdata_lib: pip install 'anomscan[review]'"
        ) from error
    run = load_run(run_dir)
    submission = Submission()
    submission.comment = (
        f"anomscan run {run.results['run_id']}: model-agnostic anomaly search, "
        f"{len(run.results['points_pb'])} anomaly-region points, luminosity "
        f"{run.results['luminosity_pb']:g} pb^-1"
    )
    n_tables = 0
    for excess in flagged_excesses(run):
        table = _excess_table(run, excess)
        if table is None:
            continue
        submission.add_table(table)
        n_tables += 1
    submission.add_table(_significance_map_table(run))
    n_tables += 1
    _write_submission(submission, output)
    return HepdataOutcome(output / "submission.yaml", n_tables)
