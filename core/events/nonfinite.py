"""Non-finite inputs (NaN, +-inf) are never dropped silently.

Every value read is checked: the count per branch travels with the chunk
(`EventChunk.non_finite`) and the objects and events removed for it with
`EventChunk.dropped_non_finite`; the rule is `NON_FINITE_RULE`, and `non_finite_note` is the
sentence every result that met any carries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import replace
from typing import Final

import awkward as ak
import numpy as np

from core.events.raw import RawEvents

NON_FINITE_RULE: Final = (
    "a non-finite value (NaN or infinity) is counted per branch; an object with a non-finite "
    "pt, eta, phi or mass is dropped, an event with a non-finite MET or weight is dropped, a "
    "jet with a non-finite b-tag score is a light jet, and an object with a non-finite "
    "isolation fails the identification"
)
"""What the reader does with non-finite inputs (reported with every result that has any)."""


def count_non_finite(arrays: ak.Array, branches: Iterable[str]) -> dict[str, int]:
    """Non-finite values (NaN, +-inf) per floating-point branch of one chunk (zeros left out)."""
    counts: dict[str, int] = {}
    for branch in branches:
        if branch not in arrays.fields:
            continue
        try:
            values = np.asarray(ak.to_numpy(ak.flatten(arrays[branch], axis=None)))
        except (TypeError, ValueError):  # a type without numbers (strings, objects)
            continue
        if values.dtype.kind != "f":
            continue
        n_bad = int(values.size - np.count_nonzero(np.isfinite(values)))
        if n_bad:
            counts[branch] = n_bad
    return counts


def drop_non_finite(raw: RawEvents) -> tuple[RawEvents, dict[str, int]]:
    """`raw` without the objects and events that hold a non-finite value (NON_FINITE_RULE)."""
    dropped: dict[str, int] = {}
    collections = dict(raw.collections)
    for name, read in raw.collections.items():
        objects = read
        finite = np.isfinite(objects.pt) & np.isfinite(objects.eta)
        finite = finite & np.isfinite(objects.phi) & np.isfinite(objects.mass)
        n_bad = int(ak.count_nonzero(~finite, axis=None))
        if n_bad:
            dropped[name] = n_bad
            objects = objects[finite]
        if "btag" in objects.fields:
            untagged = np.isnan(objects.btag) | (objects.btag == np.inf)
            if ak.any(untagged):
                btag = ak.where(untagged, -np.inf, objects.btag)
                objects = ak.with_field(objects, btag, "btag")
        collections[name] = objects
    keep = np.isfinite(raw.met_pt) & np.isfinite(raw.met_phi) & np.isfinite(raw.weight)
    if raw.soft_met is not None:
        keep &= np.isfinite(raw.soft_met[0]) & np.isfinite(raw.soft_met[1])
    raw = replace(raw, collections=collections)
    n_events = int(keep.size - np.count_nonzero(keep))
    if n_events:
        dropped["events"] = n_events
        raw = raw.masked(keep)
    return raw, dropped


def non_finite_note(non_finite: Mapping[str, int], dropped: Mapping[str, int]) -> str | None:
    """One sentence on the non-finite values read and what was dropped, or None if none."""
    if not non_finite and not dropped:
        return None
    values = ", ".join(f"{n} in {branch}" for branch, n in sorted(non_finite.items()))
    removed = ", ".join(f"{n} {what}" for what, n in dropped.items())
    return (
        f"non-finite values (NaN or infinity) read: {values or 'none'}; dropped: "
        f"{removed or 'nothing'} (rule: {NON_FINITE_RULE})"
    )


def add_counts(total: dict[str, int], counts: Mapping[str, int]) -> None:
    """Add `counts` into `total`, key by key."""
    for key, value in counts.items():
        total[key] = total.get(key, 0) + value


def summed_counts(parts: Iterable[Mapping[str, int]]) -> dict[str, int]:
    """The counts of every part added key by key."""
    total: dict[str, int] = {}
    for counts in parts:
        add_counts(total, counts)
    return total
