"""The scan's per-spectrum rule as a finished run ran it: its settings and its seeds.

An injection reruns the rule (`core.spectrum.analyse_spectrum`: background choice, checks,
bump hunt, window exclusion; no symbolic fallback) on each injected spectrum with the
check and hunt settings the run's graph gave its tools and the seed the graph gave that
spectrum at that AR point, so that a spectrum with nothing injected is analysed as the scan
analysed it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from agent.scan import ScanContext, scan_checks, spectrum_seed
from core.background import CheckOptions
from core.bumphunt import HuntOptions
from core.masses import STREAM_FIT_FROM_GEV
from core.spectrum import SpectrumAnalysis, analyse_spectrum
from tools.fits import CheckSettings
from tools.spectrum import HuntSettings

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class ScanRule:
    """The per-spectrum rule as the run's scan ran it: its settings and its seeds.

    `checks` are the robustness-check settings the graph gives `choose_background`
    (`agent.scan.graph`'s check settings of the run's config), `hunt` those of its
    `search_spectrum` calls (the tool's defaults, which the graph leaves unset) and
    `min_events` the config's fit threshold; `seed` is the graph's per-spectrum seed, from
    the config's seed. The symbolic fallback is not run (its budget is the scan's).
    """

    checks: CheckOptions
    hunt: HuntOptions
    min_events: int
    config_seed: int

    def seed(self, point_index: int, name: str) -> int:
        """The seed the scan gave spectrum `name` at its AR point number `point_index`."""
        return spectrum_seed(self.config_seed, point_index, name)

    def analyse(
        self, name: str, edges: FloatArray, counts: FloatArray, seed: int
    ) -> SpectrumAnalysis:
        """`core.spectrum.analyse_spectrum` on one spectrum, from its stream's fit start."""
        stream = name.split("/", maxsplit=1)[0]
        return analyse_spectrum(
            edges,
            counts,
            STREAM_FIT_FROM_GEV[stream],
            checks=self.checks,
            hunt=self.hunt,
            min_events=self.min_events,
            seed=seed,
        )


def scan_rule(ctx: ScanContext) -> ScanRule:
    """The rule of the run whose config `ctx` holds, with the settings its graph used."""
    return ScanRule(
        checks=CheckSettings.model_validate(scan_checks(ctx.config)).to_core(),
        hunt=HuntSettings().to_core(),
        min_events=ctx.config.min_events,
        config_seed=ctx.config.seed,
    )
