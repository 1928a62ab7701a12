"""Planning the read of one file: open its event tree, detect the schema, choose the b-tagger.

Every input goes through `uproot` (TTree or RNTuple), so local paths, ``https://`` URLs
(fsspec + aiohttp) and ``root://`` URLs (with `fsspec-xrootd` installed) work the same way.
A file is checked (tree, schema, every needed branch, entries, good-run branches) before
any event is read, and a damaged file fails with one error that names it.
"""

from __future__ import annotations

import contextlib
import struct
import uuid
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import awkward as ak
import numpy as np
import numpy.typing as npt
import uproot

from core.errors import AnomscanError, InputFileError, InvalidInputError, SchemaError
from core.events.mappings import MappingSchema, builtin_mappings, load_mapping
from core.events.schemas import BUILTIN_SCHEMAS, SCHEMA_NAMES, PhysliteSchema, Schema
from core.events.selection import ObjectSelection
from core.files import check_regular_file
from core.goodruns import GoodRunList

EVENT_TREE_NAMES: Final = ("Events", "events", "EventData", "CollectionTree", "mini", "nominal")
"""Tree names taken first when a file holds several trees (NanoAOD, PHYSLITE, open data)."""


@dataclass(frozen=True)
class ReadPlan:
    """How one file is read: the tree, the branches, the schema and the chosen b-tagger."""

    path: str
    tree: str
    schema: str
    branches: tuple[str, ...]
    btag_branch: str | None
    btag_working_point: float
    num_entries: int
    notes: tuple[str, ...] = ()
    file_uuid: str | None = None
    """The ROOT file's UUID (its identity for event keys and the event pass's provenance)."""


def _check_local_input(path: str) -> None:
    """InputFileError unless `path` is a regular file (a FIFO would block, a device stream)."""
    try:
        check_regular_file(path, "input file")
    except InvalidInputError as error:
        raise InputFileError(str(error)) from error


def _open_tree(path: str, tree_name: str | None) -> Any:
    """Open `path` and return its event tree, with one clear error per failure."""
    is_remote = "://" in path
    if not is_remote:
        _check_local_input(path)
    try:
        file = uproot.open(path)
    except Exception as error:
        raise InputFileError(
            f"cannot open {path} as a ROOT file ({type(error).__name__}: {error}); "
            "check that it is a complete ROOT file"
        ) from error
    try:
        if tree_name is not None:
            if tree_name not in file:
                raise SchemaError(
                    f"{path} has no tree {tree_name!r}; it holds {sorted(file.keys(cycle=False))}"
                )
            return file[tree_name]
        trees = [
            k
            for k, cls in file.classnames(cycle=False).items()
            if cls in ("TTree", "ROOT::RNTuple", "ROOT::Experimental::RNTuple")
        ]
    except (SchemaError, InputFileError):
        raise
    except Exception as error:
        raise InputFileError(
            f"{path} is damaged: its directory cannot be read ({type(error).__name__}: {error})"
        ) from error
    if not trees:
        raise SchemaError(f"{path} holds no TTree or RNTuple; it holds {file.keys(cycle=False)}")
    preferred = [t for t in EVENT_TREE_NAMES if t in trees]
    chosen = preferred[0] if preferred else trees[0]
    try:
        return file[chosen]
    except Exception as error:
        raise InputFileError(
            f"{path} is damaged: tree {chosen!r} cannot be read ({type(error).__name__})"
        ) from error


def _available_branches(tree: Any) -> set[str]:
    keys = tree.keys(recursive=False)
    return set(keys)


def resolve_schema(
    name: str, available: set[str], path: str, mapping: str | Path | None = None
) -> Schema:
    """The schema called `name` (or detected from `available` for ``auto``)."""
    if name not in SCHEMA_NAMES:
        raise SchemaError(f"unknown schema {name!r}; choose one of {', '.join(SCHEMA_NAMES)}")
    if name == "mapping" or mapping is not None:
        if mapping is None:
            raise SchemaError("schema 'mapping' needs a column mapping TOML (mapping=...)")
        return MappingSchema(load_mapping(mapping))
    if name != "auto":
        return next(s for s in BUILTIN_SCHEMAS if s.name == name)
    for schema in (*BUILTIN_SCHEMAS, *builtin_mappings()):
        if schema.matches(available):
            return schema
    sample = ", ".join(sorted(available)[:12])
    raise SchemaError(
        f"cannot detect the schema of {path}: its branches ({sample}, ...) match none of "
        f"{[s.name for s in BUILTIN_SCHEMAS]} nor a built-in mapping; "
        "write a column mapping TOML and pass schema='mapping'"
    )


FILL_CHECK_ENTRIES: Final = 10_000
"""Entries read to decide whether a tagger or flag is filled in a file."""


def _first_values(tree: Any, branch: str, path: str) -> npt.NDArray[Any]:
    """Every value of `branch` in the first `FILL_CHECK_ENTRIES` entries, flattened."""
    try:
        values = tree[branch].array(
            entry_stop=min(tree.num_entries, FILL_CHECK_ENTRIES), library="ak"
        )
    except Exception as error:
        raise InputFileError(f"cannot read branch {branch} of {path}: {error}") from error
    return np.asarray(ak.to_numpy(ak.flatten(values, axis=None)))


def _tagger_is_filled(tree: Any, branch: str, path: str) -> bool:
    """A tagger is filled when some jet of the first entries has a score in [0, 1]."""
    scores = _first_values(tree, branch, path)
    return bool(np.any((scores >= 0.0) & (scores <= 1.0))) if scores.size else True


def _flag_is_filled(tree: Any, branch: str, path: str) -> bool:
    """A flag is filled when some object of the first entries has it set (non-zero)."""
    flags = _first_values(tree, branch, path)
    return bool(np.any(flags != 0)) if flags.size else True


def _choose_tagger(
    tree: Any, schema: Schema, available: set[str], selection: ObjectSelection, path: str
) -> tuple[str | None, float, list[str]]:
    notes: list[str] = []
    if not schema.taggers and selection.btag_branch == "auto":
        return None, float("inf"), notes
    if selection.btag_branch != "auto":
        branch = selection.btag_branch
        if branch not in available:
            raise SchemaError(f"b-tag branch {branch!r} is not in {path} (schema {schema.name})")
        wp = selection.btag_working_point
        if wp is None:
            known = dict(schema.taggers)
            if branch not in known:
                raise InvalidInputError(
                    f"b-tag branch {branch!r} has no default working point; set btag_working_point"
                )
            wp = known[branch]
        if schema.name == "nanoaod" and not _tagger_is_filled(tree, branch, path):
            raise SchemaError(
                f"b-tag branch {branch} of {path} is not filled (no jet has a score in [0, 1]); "
                "choose another tagger"
            )
        return branch, float(wp), notes
    for branch, wp in schema.taggers:
        if branch not in available:
            continue
        if schema.name == "nanoaod" and not _tagger_is_filled(tree, branch, path):
            notes.append(f"tagger {branch} is not filled in {path}; skipped")
            continue
        chosen_wp = selection.btag_working_point if selection.btag_working_point is not None else wp
        return branch, float(chosen_wp), notes
    notes.append(f"no filled b-tagger found in {path}: every jet is a light jet")
    return None, float("inf"), notes


_DAMAGED_FILE_ERRORS: Final = (
    OSError,
    EOFError,
    ValueError,
    struct.error,
    zlib.error,
    uproot.DeserializationError,
)
"""What uproot raises on a truncated or corrupt file (an OSError for a missing chunk, ...)."""


def plan_file(
    path: str,
    schema: str,
    selection: ObjectSelection,
    tree: str | None,
    mapping: str | Path | None,
    good_runs: GoodRunList | None = None,
) -> tuple[ReadPlan, Schema, Any]:
    """The plan of one file, its schema and its open event tree (what a reader needs).

    A file whose metadata uproot can not read is an InputFileError that names it.
    """
    with _damaged_file_error(path):
        return _plan_unchecked(path, schema, selection, tree, mapping, good_runs)


@contextlib.contextmanager
def _damaged_file_error(path: str) -> Iterator[None]:
    """Turn what uproot raises on a truncated or corrupt `path` into one InputFileError."""
    try:
        yield
    except AnomscanError:
        raise
    except _DAMAGED_FILE_ERRORS as error:
        raise InputFileError(
            f"{path} is damaged or truncated: its metadata can not be read "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}); "
            "copy or download the file again"
        ) from error


def _plan_unchecked(
    path: str,
    schema: str,
    selection: ObjectSelection,
    tree: str | None,
    mapping: str | Path | None,
    good_runs: GoodRunList | None,
) -> tuple[ReadPlan, Schema, Any]:
    chosen, event_tree, available = _schema_and_tree(path, schema, tree, mapping)
    needed = chosen.branches(available, selection) + list(selection.met_branches or ())
    missing = [b for b in needed if b not in available]
    if missing:
        raise SchemaError(
            f"{path} (tree {event_tree.name}) lacks branches {missing} needed by schema "
            f"{chosen.name!r} (asked for {schema!r})"
        )
    if event_tree.num_entries == 0:
        raise InvalidInputError(f"tree {event_tree.name} of {path} has no entries")
    btag_branch, working_point, notes = _choose_tagger(
        event_tree, chosen, available, selection, path
    )
    if isinstance(chosen, PhysliteSchema) and selection.met_branches is None:
        notes.append(
            "MET is rebuilt from the selected objects plus the PVSoftTrkCore soft term: "
            "an approximation of the ATLAS MET (set met_branches to use your own)"
        )
    optional = _optional_branches(event_tree, chosen, available, selection, path, notes)
    branches = [*needed, *optional]
    if btag_branch:
        branches.append(btag_branch)
    lumi_branch = chosen.lumi_block_branch
    if lumi_branch is not None and lumi_branch in available:
        branches.append(lumi_branch)
    if good_runs is not None:
        _check_good_run_branches(chosen, available, path)
    plan = ReadPlan(
        path=path,
        tree=event_tree.name,
        schema=chosen.name,
        branches=tuple(dict.fromkeys(branches)),
        btag_branch=btag_branch,
        btag_working_point=working_point,
        num_entries=int(event_tree.num_entries),
        notes=tuple(notes),
        file_uuid=None if (identity := tree_file_uuid(event_tree)) is None else str(identity),
    )
    return plan, chosen, event_tree


def _schema_and_tree(
    path: str, schema: str, tree: str | None, mapping: str | Path | None
) -> tuple[Schema, Any, set[str]]:
    """The schema of `path`, its event tree and the tree's branches.

    A mapping's own tree is taken when no tree is named.
    """
    mapped = MappingSchema(load_mapping(mapping)) if mapping is not None else None
    tree_name = tree or (mapped.tree if mapped is not None else None)
    event_tree = _open_tree(path, tree_name)
    available = _available_branches(event_tree)
    chosen = mapped if mapped is not None else resolve_schema(schema, available, path)
    if tree_name is None and isinstance(chosen, MappingSchema) and chosen.tree:
        event_tree = _open_tree(path, chosen.tree)
        available = _available_branches(event_tree)
    return chosen, event_tree, available


def _optional_branches(
    event_tree: Any,
    chosen: Schema,
    available: set[str],
    selection: ObjectSelection,
    path: str,
    notes: list[str],
) -> list[str]:
    """The schema's optional branches present in the file, without unfilled ID flags.

    Without identification only the bookkeeping branches are read; every flag skipped
    adds a note to `notes`.
    """
    optional = [b for b in chosen.optional_branches() if b in available]
    if not selection.use_identification:
        optional = [b for b in optional if b in _BOOKKEEPING_BRANCHES]
    for flag in [b for b in optional if b in chosen.flags]:
        if not _flag_is_filled(event_tree, flag, path):
            optional.remove(flag)
            notes.append(f"identification flag {flag} is never set in {path}; not applied")
    return optional


def _check_good_run_branches(chosen: Schema, available: set[str], path: str) -> None:
    """SchemaError unless the file has the run and luminosity-block branches of its schema."""
    lumi_branch = chosen.lumi_block_branch
    absent = [
        what
        for what, branch in (("run", chosen.run_branch), ("luminosity-block", lumi_branch))
        if branch is None or branch not in available
    ]
    if absent:
        raise SchemaError(
            f"a good-run list needs the run and luminosity block of every event, but {path} "
            f"(schema {chosen.name!r}) has no {' or '.join(absent)} branch"
        )


_BOOKKEEPING_BRANCHES: Final = frozenset(
    {"run", "event", "genWeight", "runNumber", "eventNumber", "mcWeight", "EventWeight"}
)


def plan_read(
    path: str | Path,
    schema: str = "auto",
    selection: ObjectSelection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
) -> ReadPlan:
    """Open one file, detect its schema and b-tagger, and check every needed branch exists."""
    return plan_file(str(path), schema, selection or ObjectSelection(), tree, mapping)[0]


def tree_file_uuid(event_tree: Any) -> uuid.UUID | None:
    """The UUID of the ROOT file a TTree or RNTuple was read from (None if it has none)."""
    identity = getattr(getattr(event_tree, "file", None), "uuid", None)
    return identity if isinstance(identity, uuid.UUID) else None
