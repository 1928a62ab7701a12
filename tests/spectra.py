"""Known-truth mass spectra for the fit tests: the PHYSICS.md binning and expected counts.

The binning is written out here on purpose, independently of `core.masses.mass_bin_edges`,
so that the tests compare core against the formula rather than against itself.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
from scipy import integrate

from core.fit import prepare_spectrum
from core.fitfunctions import bin_integrals, get_function
from core.masses import mass_bin_edges

SQRT_S = 13000.0
FIT_RANGE = (300.0, 6000.0)
SHAPES = {
    "p3": [10.0, -4.5],
    "p4": [10.0, -4.0, -0.3],
    "p5": [10.0, -4.0, -0.3, 0.02],
    "ua2": [5.0, 20.0, -4.0],
}
"""Shape parameters (all but ln p1) of the truth spectra, per background function."""


def resolution_edges(start: float = 35.0, stop: float = SQRT_S) -> np.ndarray:
    """PHYSICS.md binning: e_{k+1} = e_k + w(e_k) up to the first edge above `stop`."""
    edges = [start]
    while edges[-1] <= stop:
        mass = edges[-1]
        edges.append(mass + mass * math.sqrt(0.84**2 / mass + 0.016**2))
    return np.array(edges)


EDGES = resolution_edges()


def expected_counts(name: str, n_events: float) -> np.ndarray:
    """Expected counts per bin of EDGES for SHAPES[name], n_events inside FIT_RANGE."""
    function = get_function(name)
    params = np.array([1.0, *SHAPES[name]])
    mu = bin_integrals(function, params, EDGES)
    problem = prepare_spectrum(EDGES, np.ones(EDGES.size - 1), FIT_RANGE)
    return mu * n_events / mu[problem.first_bin : problem.stop_bin].sum()


PLATEAU_STREAM_START = 600.0
"""Stream start (GeV) of the plateau spectrum: T7's, inside the plateau as in issue 23."""


def plateau_density(mass: float) -> float:
    """A multi-jet pair mass sculpted by 4-jet thresholds (issue 23, T7/jb), per GeV.

    A turn-on near 480 GeV, then a plateau of about flat counts per bin up to a knee near
    900 GeV with a 20 % dip at 780 GeV, then a dijet-like fall. Written here, independently
    of core.fitfunctions and core.fitrange, so that a shared mistake cannot hide.
    """
    x = mass / SQRT_S
    turn_on = 0.5 * (1.0 + math.erf((mass - 480.0) / 30.0))
    plateau = (mass / 500.0) ** -0.8 / (1.0 + (mass / 960.0) ** 14)
    dip = 1.0 - 0.2 * math.exp(-0.5 * ((mass - 780.0) / 12.0) ** 2)
    return float(turn_on * plateau * dip * (1.0 - x) ** 10)


def plateau_expected(n_events: float) -> np.ndarray:
    """Expected counts per bin of EDGES of `plateau_density` (exact integrals), n_events in all.

    Bins outside 300-8500 GeV are empty.
    """
    mu = np.zeros(EDGES.size - 1)
    for index, (low, high) in enumerate(itertools.pairwise(EDGES)):
        if low >= 300.0 and high <= 8500.0:
            mu[index] = integrate.quad(plateau_density, low, high)[0]
    return mu * (n_events / float(mu.sum()))


FIFTY_GEV_EDGES = np.linspace(1000.0, 4000.0, 61)
"""60 bins of 50 GeV over 1-4 TeV: a typical fitted spectrum (the refitted-toy tests, bench)."""


def dijet_truth(total: float) -> np.ndarray:
    """Exact bin integrals over FIFTY_GEV_EDGES of total x f(m), f ~ (1 - x)^10 x^-4,
    x = m / 13 TeV (quad of the density written here, no fit-function code)."""

    def density(m: float) -> float:
        x = m / SQRT_S
        return float((1.0 - x) ** 10.0 * x**-4.0)

    integrals = np.array(
        [integrate.quad(density, lo, hi)[0] for lo, hi in itertools.pairwise(FIFTY_GEV_EDGES)]
    )
    return np.asarray(total * integrals / integrals.sum(), dtype=np.float64)


SCULPTED_T7_JB = (
    "200000000002020130101204341110231201012030425111023213205235720010000120"
    "11221100111010301010100101000010100010010011003000000010001000011000001"
)
"""Background only: T7/jb at the 0.18 pb AR point of the validation's background_3 (core.synth,
400k events with 5 % 4-jet events, the AE's selection), resolution bins 13-155 of
`core.masses.mass_bin_edges()`, one digit per bin: a plateau to 1.6 TeV that ends in a cliff,
132 events."""


def sculpted_t7_jb() -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of `SCULPTED_T7_JB` over the scan's whole binning."""
    edges = mass_bin_edges()
    counts = np.zeros(edges.size - 1)
    counts[13 : 13 + len(SCULPTED_T7_JB)] = [int(digit) for digit in SCULPTED_T7_JB]
    return edges, counts
