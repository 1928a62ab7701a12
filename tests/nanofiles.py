"""Small NanoAOD-like ROOT files written with uproot for tests of bad inputs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import uproot


def write_events_tree(path: Path, branches: dict[str, Any]) -> Path:
    """An ``Events`` tree of `branches` (records become ``Name_field`` with counter ``nName``)."""
    with uproot.recreate(path) as file:
        file.mktree(
            "Events",
            {
                k: v.type.content if isinstance(v, ak.Array) else v.dtype
                for k, v in branches.items()
            },
            counter_name=lambda n: f"n{n}",
        )
        file["Events"].extend(branches)
    return path


def nanoaod_with_nan_muons(source: Path, path: Path, every: int = 3) -> tuple[Path, int]:
    """The NanoAOD test file rewritten with every `every`-th muon's pt set to NaN."""
    events = uproot.open(source)["Events"]
    branches: dict[str, Any] = {}
    n_nan = 0
    for prefix in ("Jet", "Muon", "Electron", "Photon"):
        names = [f"{prefix}_{v}" for v in ("pt", "eta", "phi", "mass")]
        arrays = events.arrays(names, library="ak")
        fields = {name.split("_")[1]: arrays[name] for name in names}
        if prefix == "Muon":
            flat = ak.to_numpy(ak.flatten(fields["pt"])).astype(np.float32)
            flat[::every] = np.nan
            n_nan = int(np.count_nonzero(np.isnan(flat)))
            fields["pt"] = ak.unflatten(flat, ak.num(fields["pt"]))
        branches[prefix] = ak.zip(fields)
    for name in ("MET_pt", "MET_phi"):
        branches[name] = events[name].array(library="np")
    return write_events_tree(path, branches), n_nan
