"""Column mappings: a user TOML that maps any flat or jagged ntuple onto the object collections.

`load_mapping` reads and validates one (every entry's type is checked, so a wrong file fails
with the entry named); `MappingSchema` reads the file's branches through it. The mappings
shipped with anomscan sit in ``core/mappings/`` and are tried last by the ``auto`` schema.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import awkward as ak
import numpy as np

from core.errors import InvalidInputError
from core.events.raw import (
    LEPTON_TYPES,
    RawEvents,
    float_jagged,
    four_from_cartesian,
    numpy_values,
    object_records,
    run_and_event_numbers,
)
from core.events.schemas import Schema
from core.events.selection import ObjectSelection
from core.files import read_user_text

MAPPINGS_DIR: Final = Path(__file__).parent.with_name("mappings")
"""The built-in column mappings (``core/mappings/*.toml``)."""


def _empty_collection(n: int) -> ak.Array:
    values = ak.unflatten(np.zeros(0, dtype=np.float64), np.zeros(n, dtype=np.int64))
    return object_records((values, values, values, values))


@dataclass(frozen=True)
class CollectionMapping:
    """Branches of one collection: per-slot scalar branches (flat) or one jagged branch each.

    Either ``pt``/``eta``/``phi`` with ``mass`` (a branch or a constant in GeV), or
    ``px``/``py``/``pz``/``energy``. Each value is a branch name (jagged) or a list of branch
    names (one per object slot of a flat ntuple).
    """

    components: Mapping[str, str | float | list[str]]
    btag: str | None = None
    btag_working_point: float = 0.5

    def branch_names(self) -> list[str]:
        """Every branch this collection reads."""
        names: list[str] = []
        for value in self.components.values():
            if isinstance(value, str):
                names.append(value)
            elif isinstance(value, list):
                names += value
        if self.btag:
            names.append(self.btag)
        return names


@dataclass(frozen=True)
class ColumnMapping:
    """A user mapping from any ntuple onto the object collections (loaded from TOML).

    Example for uproot-Zmumu.root (``core/mappings/cms_dimuon_flat.toml``)::

        name = "cms_dimuon_flat"
        tree = "events"
        energy_unit = "GeV"      # or "MeV"
        [ids]
        run = "Run"
        event = "Event"
        [muons]
        px = ["px1", "px2"]
        py = ["py1", "py2"]
        pz = ["pz1", "pz2"]
        energy = ["E1", "E2"]
        [met]                  # optional: pt/phi or px/py branches
    """

    mapping_name: str = "mapping"
    tree: str | None = None
    energy_scale: float = 1.0
    collections_map: Mapping[str, CollectionMapping] = field(default_factory=dict)
    met: Mapping[str, str] = field(default_factory=dict)
    ids: Mapping[str, str] = field(default_factory=dict)
    source: str = ""


class MappingSchema(Schema):
    """The schema a `ColumnMapping` defines: named ``mapping:<name>``."""

    def __init__(self, mapping: ColumnMapping) -> None:
        self.mapping = mapping
        self.tree = mapping.tree
        self.name = f"mapping:{mapping.mapping_name}"
        self.energy_scale = mapping.energy_scale
        self.lumi_block_branch = mapping.ids.get("lumi_block")
        self.run_branch = mapping.ids.get("run")
        self.identifying = tuple(self._all_branches())
        jets = mapping.collections_map.get("jets")
        self.taggers = (
            () if jets is None or jets.btag is None else ((jets.btag, jets.btag_working_point),)
        )

    def _all_branches(self) -> list[str]:
        names: list[str] = []
        for collection in self.mapping.collections_map.values():
            names += [b for b in collection.branch_names() if b != collection.btag]
        names += list(self.mapping.met.values()) + list(self.mapping.ids.values())
        return names

    def branches(self, available: set[str], selection: ObjectSelection) -> list[str]:
        """Every mapped branch."""
        return self._all_branches()

    def _component(self, arrays: ak.Array, value: str | float | list[str]) -> ak.Array:
        if isinstance(value, str):
            return float_jagged(arrays, value)
        if isinstance(value, list):
            slots = np.stack([numpy_values(arrays[b]) for b in value], axis=1)
            return ak.Array(slots.tolist()) if len(slots) == 0 else ak.from_regular(ak.Array(slots))
        raise TypeError(f"constant {value!r} has no shape; combine it with another component")

    def convert(self, arrays: ak.Array, entry_start: int, btag_branch: str | None) -> RawEvents:
        """Raw objects from the mapped branches, scaled to GeV."""
        n = len(arrays)
        mapping = self.mapping
        scale = mapping.energy_scale
        collections = {}
        for name in ("jets", *LEPTON_TYPES):
            spec = mapping.collections_map.get(name)
            if spec is None:
                records = _empty_collection(n)
            else:
                comps = spec.components
                if "px" in comps:
                    pt, eta, phi, mass = four_from_cartesian(
                        *(
                            self._component(arrays, comps[k]) * scale
                            for k in ("px", "py", "pz", "energy")
                        )
                    )
                else:
                    pt = self._component(arrays, comps["pt"]) * scale
                    eta = self._component(arrays, comps["eta"])
                    phi = self._component(arrays, comps["phi"])
                    raw_mass = comps.get("mass", 0.0)
                    if isinstance(raw_mass, int | float):
                        mass = ak.zeros_like(pt) + float(raw_mass)
                    else:
                        mass = self._component(arrays, raw_mass) * scale
                btag = None
                if name == "jets" and spec.btag:
                    btag = self._component(arrays, spec.btag)
                records = object_records((pt, eta, phi, mass), btag=btag)
            if name == "jets" and "btag" not in records.fields:
                records = ak.with_field(records, ak.zeros_like(records.pt) - 1.0, "btag")
            collections[name] = records
        met = mapping.met
        if "pt" in met:
            met_pt = numpy_values(arrays[met["pt"]]) * scale
            met_phi = numpy_values(arrays[met["phi"]])
        elif "px" in met:
            px, py = (
                numpy_values(arrays[met["px"]]) * scale,
                numpy_values(arrays[met["py"]]) * scale,
            )
            met_pt, met_phi = np.hypot(px, py), np.arctan2(py, px)
        else:
            met_pt, met_phi = np.zeros(n), np.zeros(n)
        ids = mapping.ids
        run, event = run_and_event_numbers(arrays, entry_start, ids.get("run"), ids.get("event"))
        weight = numpy_values(arrays[ids["weight"]]) if "weight" in ids else np.ones(n)
        return RawEvents(collections, met_pt, met_phi, run, event, weight)


def load_mapping(path: str | Path) -> ColumnMapping:
    """Read a column mapping from a TOML file (see `ColumnMapping` for the format)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"column mapping {path} does not exist")
    try:
        data = tomllib.loads(read_user_text(path, "column mapping"))
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"column mapping {path} is not valid TOML: {error}") from error
    _check_mapping_types(data, path)
    units = {"GeV": 1.0, "MeV": 1e-3, "TeV": 1e3}
    unit = data.get("energy_unit", "GeV")
    if unit not in units:
        raise InvalidInputError(f"column mapping {path}: energy_unit {unit!r} not in {list(units)}")
    collections: dict[str, CollectionMapping] = {}
    for name in ("jets", *LEPTON_TYPES):
        if name not in data:
            continue
        spec = dict(data[name])
        btag = spec.pop("btag", None)
        working_point = float(spec.pop("btag_working_point", 0.5))
        keys = set(spec)
        if not ({"px", "py", "pz", "energy"} <= keys or {"pt", "eta", "phi"} <= keys):
            raise InvalidInputError(
                f"column mapping {path}: [{name}] needs px, py, pz, energy or pt, eta, phi "
                f"(and mass); found {sorted(keys)}"
            )
        collections[name] = CollectionMapping(spec, btag, working_point)
    if not collections:
        raise InvalidInputError(
            f"column mapping {path} maps no collection; add a [jets], [muons], [electrons] "
            "or [photons] table"
        )
    return ColumnMapping(
        mapping_name=str(data.get("name", path.stem)),
        tree=data.get("tree"),
        energy_scale=units[unit],
        collections_map=collections,
        met=dict(data.get("met", {})),
        ids=dict(data.get("ids", {})),
        source=str(path),
    )


def _check_mapping_types(data: Mapping[str, Any], path: Path) -> None:
    """InvalidInputError naming the first entry of a mapping whose type is wrong."""

    def fail(where: str, expected: str, value: Any) -> None:
        raise InvalidInputError(
            f"column mapping {path}: {where} must be {expected}, found {value!r}; see "
            "core/mappings/*.toml for examples"
        )

    for key in ("name", "tree", "energy_unit"):
        if key in data and not isinstance(data[key], str):
            fail(key, "a string", data[key])
    for table in ("met", "ids"):
        if table in data:
            entries = data[table]
            if not isinstance(entries, dict):
                fail(f"[{table}]", "a table of branch names", entries)
            for key, value in entries.items():
                if not isinstance(value, str):
                    fail(f"[{table}] {key}", "a branch name (string)", value)
    for name in ("jets", *LEPTON_TYPES):
        if name not in data:
            continue
        spec = data[name]
        if not isinstance(spec, dict):
            fail(f"[{name}]", "a table", spec)
        for key, value in spec.items():
            where = f"[{name}] {key}"
            if key == "btag":
                if not isinstance(value, str):
                    fail(where, "a branch name (string)", value)
            elif key == "btag_working_point" or isinstance(value, int | float):
                if isinstance(value, bool) or not isinstance(value, int | float):
                    fail(where, "a number", value)
                if not math.isfinite(value):
                    fail(where, "a finite number", value)
            elif isinstance(value, list):
                if not value or not all(isinstance(item, str) for item in value):
                    fail(where, "a non-empty list of branch names", value)
            elif not isinstance(value, str):
                fail(where, "a branch name, a list of branch names or a number", value)


def builtin_mappings() -> list[MappingSchema]:
    """The column mappings shipped with anomscan (tried last by ``auto``)."""
    return [MappingSchema(load_mapping(p)) for p in sorted(MAPPINGS_DIR.glob("*.toml"))]
