"""What the terminal shows while a scan runs: stage, AR points done, elapsed time and ETA.

The progress line is drawn on stderr (rich, transient), never on stdout: the printed
results stay the only output a script reads. The ETA comes from the mean time per AR
point done so far, so it appears after the first point and grows when refinements add
points.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from rich.progress_bar import ProgressBar
from rich.table import Table

__all__ = ["Progress", "ProgressLine", "duration_text"]


@dataclass
class Progress:
    """What the progress display shows: stage, AR points done / planned, and more.

    Also the spectra of the current point done / to fit, the elapsed time and the ETA of
    the planned points (from the mean time per point done; refinements add points).
    """

    stage: str = "starting"
    point: str = ""
    points_done: int = 0
    points_planned: int = 0
    spectra_done: int = 0
    spectra_total: int = 0
    started: float = field(default_factory=time.monotonic)
    sweep_started: float | None = None
    callback: Callable[[Progress], None] | None = None

    def update(self, **changes: Any) -> None:
        """Change some fields and redraw."""
        for key, value in changes.items():
            setattr(self, key, value)
        if self.points_planned and self.sweep_started is None:
            self.sweep_started = time.monotonic()
        if self.callback is not None:
            self.callback(self)

    def fraction(self) -> float:
        """The share of the planned AR points done (the current point by its spectra)."""
        if not self.points_planned:
            return 0.0
        current = self.spectra_done / self.spectra_total if self.spectra_total else 0.0
        return min(1.0, (self.points_done + current) / self.points_planned)

    def eta_s(self) -> float | None:
        """Seconds left for the planned points, from the mean time of the points done."""
        if self.sweep_started is None or self.points_done == 0:
            return None
        per_point = (time.monotonic() - self.sweep_started) / self.points_done
        return max(0.0, per_point * (self.points_planned - self.points_done))

    def line(self) -> str:
        """One line of progress."""
        parts = [self.stage]
        if self.point:
            parts.append(self.point)
        if self.spectra_total:
            parts.append(f"spectra {self.spectra_done}/{self.spectra_total}")
        parts.append(f"elapsed {duration_text(time.monotonic() - self.started)}")
        eta = self.eta_s()
        if self.points_done < self.points_planned:  # the look-elsewhere has no estimate
            parts.append("ETA " + ("after the first point" if eta is None else duration_text(eta)))
        return " | ".join(parts)


def duration_text(seconds: float) -> str:
    """A duration as a person reads it: 42 s, 3 min 05 s, 1 h 02 min."""
    whole = round(seconds)
    if whole < 60:
        return f"{whole} s"
    if whole < 3600:
        return f"{whole // 60} min {whole % 60:02d} s"
    return f"{whole // 3600} h {whole % 3600 // 60:02d} min"


class ProgressLine:
    """A rich renderable that redraws the progress line on every refresh."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    def __rich__(self) -> Table:
        """The bar (once points are planned), the points done and the progress line."""
        grid = Table.grid(padding=(0, 1))
        progress = self.progress
        if progress.points_planned:
            done = f"{progress.points_done}/{progress.points_planned} points"
            bar = ProgressBar(total=1.0, completed=progress.fraction(), width=24)
            grid.add_row("[bold cyan]anomscan scan[/]", bar, done, progress.line())
        else:
            grid.add_row("[bold cyan]anomscan scan[/]", progress.line())
        return grid
