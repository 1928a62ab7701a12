"""What `anomscan inject` is asked to inject, and the check of that request.

X -> pair of the requested mass (GeV) and Gaussian width (a fraction of the mass, combined
with the resolution: `core.reinterp.signal_sigma_gev`) at several cross-sections (pb), in
the streams whose fit range holds the mass. `check_request` refuses bad input before
anything is read or generated, with what was expected and what to do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from agent.runtime.executor import Executor
from core.errors import InvalidInputError
from core.masses import PAIRS, STREAMS
from core.reinterp import signal_sigma_gev
from tools.reinterp import fit_ranges

BackgroundToys = Literal["fit", "data"]
"""The background of an injection toy: the run's prediction drawn anew, or the run's data."""


@dataclass(frozen=True)
class InjectionRequest:
    """What to inject: X -> pair at mass (GeV) of width fraction, at several cross-sections."""

    pair: str
    mass: float
    width: float
    xsec_pb: tuple[float, ...]
    streams: tuple[str, ...] | None = None
    toys: int = 1
    seed: int = 0
    extra: dict[str, int] = field(default_factory=dict)
    executor: Executor = "serial"
    name: str = ""
    background: BackgroundToys = "fit"
    """Toys' background: "fit" a Poisson draw of the run's accepted prediction, "data" the
    run's data (agent/reinterp/injection.py)."""
    rule_toys: int | None = None
    """The scan's rule is rerun in the first `rule_toys` toys of each strength (None: all);
    the run-function and fixed-shape recoveries run in every toy. The rule (choice, checks,
    bump hunt) costs ~1 s a spectrum, the two fits a fraction of it."""

    def label(self) -> str:
        """The output name: NAME or pair-mass-width."""
        return self.name or f"{self.pair}-{self.mass:g}-w{self.width:g}"


def check_request(request: InjectionRequest) -> list[str]:
    """The streams to analyse; InvalidInputError (what, where, what to do) for bad input."""
    if request.pair not in PAIRS:
        raise InvalidInputError(
            f"--pair {request.pair!r} is not one of the 9 pairs {list(PAIRS)}; e.g. --pair jm"
        )
    bad = [x for x in request.xsec_pb if not (math.isfinite(x) and x > 0)]
    if not request.xsec_pb or bad:
        raise InvalidInputError(
            f"--xsec must be positive cross-sections in pb, got {list(request.xsec_pb)}; e.g. "
            "--xsec 0.02,0.05,0.1"
        )
    if request.toys < 1 or request.toys > 1000:
        raise InvalidInputError(f"--toys must be in 1..1000, got {request.toys}")
    if request.seed < 0:
        raise InvalidInputError(f"--seed must be a non-negative integer, got {request.seed}")
    if request.rule_toys is not None and not 0 <= request.rule_toys <= request.toys:
        raise InvalidInputError(
            f"--rule-toys must be in 0..--toys ({request.toys}), got {request.rule_toys}"
        )
    if request.background not in ("fit", "data"):
        raise InvalidInputError(
            f"--background {request.background!r}: expected 'fit' (toys drawn from the run's "
            "background prediction) or 'data' (the run's data in every toy)"
        )
    signal_sigma_gev(request.mass, request.width)
    ranges = fit_ranges()
    if request.streams is not None:
        unknown = [s for s in request.streams if s not in STREAMS]
        if unknown:
            raise InvalidInputError(f"--stream {unknown}: not streams; give some of {STREAMS}")
        outside = [s for s in request.streams if not ranges[s][0] < request.mass < ranges[s][1]]
        if outside:
            raise InvalidInputError(
                f"--mass {request.mass:g} GeV lies outside the fit range of stream(s) "
                + ", ".join(f"{s} ({ranges[s][0]:g}-{ranges[s][1]:g} GeV)" for s in outside)
                + "; choose a mass inside or other --stream"
            )
        return list(request.streams)
    inside = [s for s in STREAMS if ranges[s][0] < request.mass < ranges[s][1]]
    if not inside:
        low = min(r[0] for r in ranges.values())
        high = max(r[1] for r in ranges.values())
        raise InvalidInputError(
            f"--mass {request.mass:g} GeV lies outside every spectrum's fit range "
            f"({low:g}-{high:g} GeV); choose a mass inside it"
        )
    return inside
