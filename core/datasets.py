"""Dataset manifests: named sets of ROOT files with their luminosity, sqrt(s) and good runs.

A manifest is TOML, one table per dataset::

    [datasets.cms_2015_ttbar]
    files = ["data/nano_*.root", "https://host/path/file.root"]   # paths, globs or URLs
    schema = "nanoaod"        # or auto, atlas_opendata, physlite, cartesian, mapping
    tree = "Events"           # optional
    sqrt_s = 13000.0          # GeV
    lumi_pb = 2256.4          # integrated luminosity in pb^-1, > 0
    kind = "data"             # or "simulation"
    good_runs = "golden.json" # optional: CMS golden JSON or ATLAS GRL XML
    mapping = "columns.toml"  # only for schema = "mapping"

Relative paths are taken from the manifest's folder. Everything a long scan depends on is
checked when the manifest is loaded (files exist, globs match, luminosity is positive, the
good-run list parses), and `validate_dataset` opens every file before any work starts.
"""

from __future__ import annotations

import glob
import math
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import numpy as np

from core.errors import AnomscanError, InvalidInputError, SchemaError
from core.events.planning import plan_read
from core.events.reading import count_certified
from core.events.schemas import SCHEMA_NAMES
from core.events.selection import ObjectSelection
from core.files import read_user_text
from core.goodruns import GoodRunList, load_good_run_list

DatasetKind = Literal["data", "simulation"]
MANIFEST_KEYS: Final = frozenset(
    {"files", "schema", "tree", "sqrt_s", "lumi_pb", "kind", "good_runs", "mapping"}
)


@dataclass(frozen=True)
class Dataset:
    """One named dataset: resolved files, how to read them, and its luminosity in pb^-1."""

    name: str
    files: tuple[str, ...]
    schema: str
    lumi_pb: float
    sqrt_s: float = 13000.0
    kind: DatasetKind = "data"
    tree: str | None = None
    mapping: str | None = None
    good_runs: GoodRunList | None = None

    def record(self) -> dict[str, Any]:
        """Plain data for the run record."""
        return {
            "name": self.name,
            "files": list(self.files),
            "schema": self.schema,
            "lumi_pb": self.lumi_pb,
            "sqrt_s": self.sqrt_s,
            "kind": self.kind,
            "tree": self.tree,
            "good_runs": None if self.good_runs is None else self.good_runs.source,
        }


@dataclass(frozen=True)
class FileReport:
    """What validation found in one file."""

    path: str
    schema: str
    entries: int
    size_bytes: int | None
    in_good_runs: int | None
    notes: tuple[str, ...]


def _is_url(text: str) -> bool:
    return "://" in text


def _resolve_files(patterns: list[str], folder: Path, dataset: str) -> tuple[str, ...]:
    files: list[str] = []
    for pattern in patterns:
        if _is_url(pattern):
            files.append(pattern)
            continue
        full = pattern if Path(pattern).is_absolute() else str(folder / pattern)
        if glob.has_magic(full):
            matches = sorted(glob.glob(full))  # noqa: PTH207 (patterns may be absolute)
            if not matches:
                raise InvalidInputError(
                    f"dataset {dataset!r}: the pattern {pattern!r} matches no file in {folder}"
                )
            files += matches
        elif not Path(full).is_file():
            raise InvalidInputError(f"dataset {dataset!r}: file {full} does not exist")
        else:
            files.append(full)
    if not files:
        raise InvalidInputError(f"dataset {dataset!r} lists no files")
    return tuple(files)


def _positive(value: Any, key: str, dataset: str) -> float:
    if value is None:
        raise InvalidInputError(
            f"dataset {dataset!r} has no {key}; the anomaly regions in pb need it"
        )
    limit = _LIMITS[key]
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not math.isfinite(value)
        or value <= 0
    ):
        raise InvalidInputError(f"dataset {dataset!r}: {key} must be > 0 and finite, got {value!r}")
    if value > limit:
        raise InvalidInputError(f"dataset {dataset!r}: {key} = {value} is above {limit:g}")
    return float(value)


_LIMITS: Final = {"lumi_pb": 1e9, "sqrt_s": 1e6}


def _dataset(name: str, table: dict[str, Any], folder: Path) -> Dataset:
    unknown = set(table) - MANIFEST_KEYS
    if unknown:
        raise InvalidInputError(
            f"dataset {name!r}: unknown keys {sorted(unknown)}; allowed: {sorted(MANIFEST_KEYS)}"
        )
    files = table.get("files")
    if isinstance(files, str):
        files = [files]
    if not isinstance(files, list) or not all(isinstance(f, str) for f in files):
        raise InvalidInputError(f"dataset {name!r}: 'files' must be a list of paths or URLs")
    schema = table.get("schema", "auto")
    if schema not in SCHEMA_NAMES:
        raise SchemaError(
            f"dataset {name!r}: unknown schema {schema!r}; choose from {SCHEMA_NAMES}"
        )
    kind = table.get("kind", "data")
    if kind not in ("data", "simulation"):
        raise InvalidInputError(f"dataset {name!r}: kind must be 'data' or 'simulation'")
    good_runs = None
    if "good_runs" in table:
        grl_path = Path(table["good_runs"])
        good_runs = load_good_run_list(grl_path if grl_path.is_absolute() else folder / grl_path)
        if good_runs.n_runs == 0:
            raise InvalidInputError(
                f"dataset {name!r}: the good-run list {good_runs.source} certifies no run"
            )
    mapping = table.get("mapping")
    if mapping is not None and not Path(mapping).is_absolute():
        mapping = str(folder / mapping)
    return Dataset(
        name=name,
        files=_resolve_files(files, folder, name),
        schema=schema,
        lumi_pb=_positive(table.get("lumi_pb"), "lumi_pb", name),
        sqrt_s=_positive(table.get("sqrt_s", 13000.0), "sqrt_s", name),
        kind=kind,
        tree=table.get("tree"),
        mapping=mapping,
        good_runs=good_runs,
    )


def load_manifest(path: str | Path) -> dict[str, Dataset]:
    """Every dataset of a manifest, checked (see the module docstring for the format)."""
    path = Path(path)
    if not path.is_file():
        raise InvalidInputError(f"manifest {path} does not exist")
    try:
        data = tomllib.loads(read_user_text(path, "manifest"))
    except tomllib.TOMLDecodeError as error:
        raise InvalidInputError(f"manifest {path} is not valid TOML: {error}") from error
    tables = data.get("datasets")
    if not isinstance(tables, dict) or not tables:
        raise InvalidInputError(f"manifest {path} has no [datasets.NAME] table")
    return {name: _dataset(name, table, path.parent) for name, table in tables.items()}


def _file_size(path: str) -> int | None:
    if _is_url(path):
        return None
    return Path(path).stat().st_size


def validate_dataset(
    dataset: Dataset, selection: ObjectSelection | None = None, *, check_good_runs: bool = True
) -> list[FileReport]:
    """Open every file, check its schema against the declared one, and count certified events.

    Raises SchemaError when a file has another schema than declared, InputFileError when a
    file cannot be read, and InvalidInputError when the good-run list excludes every event.
    """
    selection = selection or ObjectSelection()
    reports = []
    certified_total = 0
    for path in dataset.files:
        plan = plan_read(
            path,
            "auto" if dataset.schema == "mapping" else dataset.schema,
            selection,
            tree=dataset.tree,
            mapping=dataset.mapping,
        )
        if dataset.schema not in ("auto", "mapping"):
            try:
                detected = plan_read(path, "auto", selection, tree=dataset.tree).schema
            except AnomscanError:
                detected = "unknown"
            if detected != dataset.schema:
                raise SchemaError(
                    f"dataset {dataset.name!r}: {path} looks like {detected!r} but the manifest "
                    f"declares {dataset.schema!r}"
                )
        in_good_runs = None
        if check_good_runs and dataset.good_runs is not None:
            in_good_runs, _ = count_certified(
                path,
                dataset.good_runs,
                dataset.schema,
                selection,
                tree=dataset.tree,
                mapping=dataset.mapping,
            )
            certified_total += in_good_runs
        reports.append(
            FileReport(
                path, plan.schema, plan.num_entries, _file_size(path), in_good_runs, plan.notes
            )
        )
    if check_good_runs and dataset.good_runs is not None and certified_total == 0:
        entries = int(np.sum([r.entries for r in reports]))
        raise InvalidInputError(
            f"dataset {dataset.name!r}: the good-run list {dataset.good_runs.source} excludes "
            f"every one of the {entries} events; check that it belongs to these runs"
        )
    return reports
