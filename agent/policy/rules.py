"""`RulesPolicy`, the deterministic default policy of a scan.

The rules (the reference behaviour of the scan, agent/scan/graph.py):
- AR points: log-uniform from `xsec_range` with `points_per_decade` per decade.
- Background: accept the first candidate that passed every check, in the order
  `choose_background` tried them (the F-test's choice, then larger functions).
- Symbolic fallback: only when no candidate passed (unmasked, nor with a flagged window
  masked), `core.spectrum.fallback_applies` (every nested function failed the goodness of
  fit, at least `FALLBACK_MIN_EVENTS` events in the fit range: the library's rule) and the
  scan's fallback budget is not spent (each search costs ~15 s).
- Refinement: after the planned points, the geometric midpoint between a spectrum's
  best point and each neighbour where its local Z >= `REFINE_LOCAL_Z` and grows towards
  the best point; then midpoints between neighbours where a background was accepted at
  one and none passed at the other; never between two points whose regions are both the
  whole stream (the same events). At most `REFINE_PER_ROUND` new points per round.
- Stop: when no point is proposed, or the point or time budget is spent (the gates).
"""

from __future__ import annotations

import math

from agent.policy.protocol import (
    AuditRow,
    BackgroundProposal,
    Candidate,
    FallbackProposal,
    PointOutcome,
    PointsProposal,
)
from core.anomaly import log_uniform_xsec_grid, point_text
from core.spectrum import FALLBACK_MIN_EVENTS as LIBRARY_FALLBACK_MIN_EVENTS
from core.spectrum import fallback_applies

REFINE_LOCAL_Z = 2.5
REFINE_PER_ROUND = 2
MIN_POINT_RATIO = 1.15
"""Two AR points closer than this factor in cross-section are not split further."""
FALLBACK_MIN_EVENTS = LIBRARY_FALLBACK_MIN_EVENTS
"""Events above the stream's start the symbolic fallback needs (core.spectrum's rule)."""


def _midpoint(low: float, high: float) -> float:
    """Geometric midpoint rounded to 4 significant digits (pb)."""
    value = math.sqrt(low * high)
    return float(f"{value:.4g}")


def _growing_excess(name: str, ordered: list[PointOutcome]) -> list[tuple[float, float, str]]:
    """(local Z, midpoint, reason) where spectrum `name`'s excess grows towards its best point.

    Between the best point (local Z >= REFINE_LOCAL_Z) and each neighbour of lower local Z,
    `ordered` being the scanned points sorted by cross-section.
    """
    xsecs = [o.point_pb for o in ordered]
    z = [o.spectra[name].local_z if name in o.spectra else None for o in ordered]
    values = [v if v is not None else -math.inf for v in z]
    best = max(range(len(values)), key=lambda i: values[i]) if values else 0
    whole = [o.spectra[name].whole_stream if name in o.spectra else False for o in ordered]
    if not values or values[best] < REFINE_LOCAL_Z:
        return []
    growing: list[tuple[float, float, str]] = []
    for neighbour in (best - 1, best + 1):
        if not 0 <= neighbour < len(xsecs) or (whole[best] and whole[neighbour]):
            continue  # both regions are the whole stream: the same events
        if values[neighbour] < values[best]:
            low, high = sorted((xsecs[best], xsecs[neighbour]))
            if high / low >= MIN_POINT_RATIO:
                growing.append(
                    (
                        values[best],
                        _midpoint(low, high),
                        f"{name}: local Z {values[best]:.2f} at "
                        f"{point_text(xsecs[best])} pb "
                        f"grows from {max(values[neighbour], 0):.2f} at "
                        f"{point_text(xsecs[neighbour])} pb",
                    )
                )
    return growing


def _failing_neighbours(name: str, ordered: list[PointOutcome]) -> list[tuple[float, str]]:
    """(midpoint, reason) between neighbours where a background passed at one and not the other.

    For spectrum `name`; never between two points whose regions are both the whole stream.
    """
    xsecs = [o.point_pb for o in ordered]
    failing: list[tuple[float, str]] = []
    for i in range(len(ordered) - 1):
        here = ordered[i].spectra.get(name)
        there = ordered[i + 1].spectra.get(name)
        if here is None or there is None:
            continue
        statuses = {here.status, there.status}
        same_events = here.whole_stream and there.whole_stream
        if (
            statuses == {"excess", "no background"}
            and not same_events
            and xsecs[i + 1] / xsecs[i] >= MIN_POINT_RATIO
        ):
            failing.append(
                (
                    _midpoint(xsecs[i], xsecs[i + 1]),
                    f"{name}: a background passed at one of {xsecs[i]:g} and "
                    f"{point_text(xsecs[i + 1])} pb and none at the other",
                )
            )
    return failing


class RulesPolicy:
    """The deterministic reference policy (no network); see the module docstring."""

    name = "rules"

    def initial_points(
        self, xsec_range: tuple[float, float], points_per_decade: int
    ) -> PointsProposal:
        """Log-uniform grid over `xsec_range` (pb), both ends included."""
        grid = log_uniform_xsec_grid(points_per_decade, xsec_range[0], xsec_range[1])
        points = sorted((float(p) for p in grid), reverse=True)
        return PointsProposal(
            points_pb=points,
            stop=False,
            rationale=(
                f"log-uniform grid {xsec_range[0]:g}..{xsec_range[1]:g} pb, "
                f"{points_per_decade} per decade: {len(points)} points, loosest first"
            ),
        )

    def next_points(
        self, outcomes: list[PointOutcome], xsec_range: tuple[float, float], remaining: int
    ) -> PointsProposal:
        """Midpoints where a local excess grows, then where a check failed at a neighbour."""
        ordered = sorted(outcomes, key=lambda o: o.point_pb)
        xsecs = [o.point_pb for o in ordered]
        names = sorted({name for o in ordered for name in o.spectra})
        growing: list[tuple[float, float, str]] = []
        failing: list[tuple[float, str]] = []
        for name in names:
            growing += _growing_excess(name, ordered)
            failing += _failing_neighbours(name, ordered)
        growing.sort(key=lambda item: -item[0])
        chosen: list[float] = []
        reasons: list[str] = []
        for point, reason in [(p, r) for _, p, r in growing] + failing:
            if len(chosen) >= min(REFINE_PER_ROUND, remaining):
                break
            if any(abs(point / known - 1.0) < 1e-9 for known in chosen + xsecs):
                continue
            chosen.append(point)
            reasons.append(f"{point_text(point)} pb ({reason})")
        if not chosen:
            why = "no point budget left" if remaining <= 0 else "no excess grows between points"
            return PointsProposal(points_pb=[], stop=True, rationale=f"stop: {why}")
        return PointsProposal(points_pb=chosen, stop=False, rationale="; ".join(reasons))

    def accept_background(
        self, spectrum: str, point_pb: float, candidates: list[Candidate]
    ) -> BackgroundProposal:
        """The first candidate (in the order tried) that passed every check."""
        for candidate in candidates:
            if candidate.passed:
                return BackgroundProposal(
                    spectrum=spectrum,
                    point_pb=point_pb,
                    function=candidate.function,
                    rationale=(
                        f"{candidate.function} is the first function tried that passed every "
                        f"check ({', '.join(c.name for c in candidate.checks)})"
                    ),
                )
        failed = [
            f"{c.function}: "
            + (
                ", ".join(k.name for k in c.checks if not k.passed)
                if c.checks
                else "not checked (the F-test preferred another function)"
            )
            for c in candidates
        ]
        return BackgroundProposal(
            spectrum=spectrum,
            point_pb=point_pb,
            function=None,
            rationale="no candidate passed every check ("
            + ("; ".join(failed) or "none fitted")
            + ")",
        )

    def fallback(
        self,
        spectrum: str,
        point_pb: float,
        candidates: list[Candidate],
        n_in_range: int,
        fallbacks_left: int,
    ) -> FallbackProposal:
        """Symbolic fallback for a shape the nested family can not describe (see the rules)."""
        gof_failed = [
            any(k.name == "goodness_of_fit" and not k.passed for k in c.checks)
            for c in candidates
            if c.source == "nested"
        ]
        if any(c.passed for c in candidates):
            use, why = False, "a candidate passed"
        elif fallbacks_left <= 0:
            use, why = False, "the scan's fallback budget is spent"
        else:
            use, why = fallback_applies(gof_failed, n_in_range)
        return FallbackProposal(
            spectrum=spectrum, point_pb=point_pb, use_fallback=use, rationale=why
        )

    def take_rows(self) -> list[AuditRow]:
        """The rules queue no audit rows of their own: the graph records their decisions."""
        return []

    def decided_by(self) -> str:
        """Always the rules."""
        return self.name

    def prompts_sha256(self) -> dict[str, str] | None:
        """None: the rules send no prompt."""
        return None
