"""Known-truth mass spectra for the fit tests: the PHYSICS.md binning and expected counts.

The binning is written out here on purpose, independently of `core.masses.mass_bin_edges`,
so that the tests compare core against the formula rather than against itself.
"""

from __future__ import annotations

import math

import numpy as np

from core.fit import prepare_spectrum
from core.fitfunctions import bin_integrals, get_function

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
