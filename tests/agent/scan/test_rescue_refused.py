"""The graph's side of the rescue bound: a rescued background whose masked excess is not
decisive leaves the spectrum without a background, with a `rescue_refused` decision row, as
`core.spectrum.analyse_spectrum` does (tests/core/test_spectrum.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from agent.runtime.audit import AuditLog
from agent.runtime.executor import FanOut
from agent.scan import ScanConfig, ScanContext
from agent.scan.context import ToolResult
from agent.scan.nodes.bumps import _hunt_spectrum, _PointHunt
from core.masses import SPECTRUM_NAMES
from tests.spectra import sculpted_t7_jb
from tools.registry import get_tool


def test_a_rescue_whose_masked_excess_is_not_decisive_is_refused(tmp_path: Path) -> None:
    """T7/jb of the validation's background_3 at 0.18 pb, p2 chosen with 1368-1565 GeV masked
    (the old rescue): the masked hunt gives local Z 5.2 with a Bonferroni bound of 5e-4 >
    1e-5, so the spectrum ends as "no background" and the decision row says why."""
    edges, counts = sculpted_t7_jb()
    start, low, high = np.searchsorted(edges, [620.0, 1367.0, 1565.0])
    window = [float(edges[low]), float(edges[high])]
    arguments = {
        "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
        "fit_range": [float(edges[start]), 8534.6],
        "function": "p2",
        "masked_window_gev": window,
        "seed": 0,
    }
    out = get_tool("search_spectrum").call(arguments)
    assert out["mask_from"] == "choice" and out["bump"]["local_z"] > 5.0
    entry = {"status": "accepted", "name": "p2", "checks_passed": True, "masked_window_gev": window}
    name = "T7/jb"
    hunt = _PointHunt("0005-hunt", 0.1778, {}, np.zeros((63, edges.size - 1)), np.zeros((63, 1)))
    audit = AuditLog(tmp_path / "audit.sqlite")
    with FanOut("serial") as fan_out, audit.transaction():
        ctx = ScanContext(ScanConfig(run_dir=str(tmp_path)), audit, fan_out)
        _hunt_spectrum(
            ctx, hunt, SPECTRUM_NAMES.index(name), name, entry, ToolResult(name, out, None)
        )
    assert hunt.outcomes[name]["status"] == "no background"
    assert hunt.spectra[-1]["reason"].startswith("no accepted background: rescue not kept")
    rows = [row for row in audit.rows("decisions") if row["kind"] == "rescue_refused"]
    audit.close()
    assert len(rows) == 1 and rows[0]["spectrum"] == name
    numbers = json.loads(rows[0]["numbers"])
    assert 1e-4 < numbers["bonferroni_bound"] < 1e-2 and numbers["rescue_bound"] == 1e-5
