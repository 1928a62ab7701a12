"""Reading events: files chunk by chunk into selected objects, each file checked first.

A unit of work is an entry range of one file (`read_entry_range`); `iterate_events` walks
files chunk after chunk, so memory is bounded by the chunk size. A file listed twice, or two
copies of one ROOT file (the same UUID), are refused: their events would count twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import numpy.typing as npt

from core.errors import InputFileError, InvalidInputError, SchemaError
from core.events.nonfinite import count_non_finite, drop_non_finite, summed_counts
from core.events.planning import ReadPlan, plan_file, tree_file_uuid
from core.events.raw import FloatArray, numpy_values
from core.events.schemas import Schema
from core.events.selection import ObjectSelection, select_objects
from core.goodruns import GoodRunList
from core.objects import OBJECT_TYPES, EventChunk, event_keys, file_id


def _as_paths(paths: str | Path | Iterable[str | Path]) -> list[str]:
    if isinstance(paths, str | Path):
        return [str(paths)]
    listed = [str(p) for p in paths]
    if not listed:
        raise InvalidInputError("no input files given")
    refuse_duplicate_inputs(listed)
    return listed


def _normalised(path: str) -> str:
    if "://" in path:
        return path
    try:
        return str(Path(path).resolve())
    except (OSError, RuntimeError, ValueError):
        return path


def refuse_duplicate_inputs(paths: Iterable[str | Path]) -> None:
    """InvalidInputError when a file is listed twice (it would count its events twice)."""
    seen: dict[str, str] = {}
    for path in map(str, paths):
        key = _normalised(path)
        if key in seen:
            raise InvalidInputError(
                f"input file {path} is listed twice (also as {seen[key]}); its events would "
                "count twice: list every file once"
            )
        seen[key] = path


class DistinctFiles:
    """Refuses a second file with the UUID of one already read (a copy of the same events)."""

    def __init__(self) -> None:
        self._seen: dict[uuid.UUID, str] = {}

    def check(self, path: str, identity: uuid.UUID | None) -> None:
        """Record `path`; InvalidInputError if a file with the same UUID came before."""
        if identity is None:
            return
        if identity in self._seen:
            raise InvalidInputError(
                f"input files {self._seen[identity]} and {path} are the same ROOT file (UUID "
                f"{identity}); their events would count twice: list every file once"
            )
        self._seen[identity] = path


def _per_event(arrays: ak.Array, branch: str, path: str) -> FloatArray:
    """One float per event from `branch`; SchemaError when it holds lists."""
    values = arrays[branch]
    if values.ndim != 1:
        raise SchemaError(
            f"branch {branch} of {path} holds {values.type}, not one value per event; "
            "a MET branch must be a scalar per event"
        )
    return numpy_values(values)


def _read_range(
    plan: ReadPlan,
    schema: Schema,
    event_tree: Any,
    start: int,
    stop: int,
    selection: ObjectSelection,
    good_runs: GoodRunList | None,
) -> EventChunk:
    path = plan.path
    try:
        arrays = event_tree.arrays(
            list(plan.branches), entry_start=start, entry_stop=stop, library="ak"
        )
    except Exception as error:
        raise InputFileError(
            f"reading entries {start}..{stop} of {path} failed "
            f"({type(error).__name__}: {error}); the file may be truncated or corrupt"
        ) from error
    non_finite = count_non_finite(arrays, plan.branches)
    raw = schema.convert(arrays, start, plan.btag_branch)
    if selection.met_branches is not None:
        px, py = (_per_event(arrays, b, path) * schema.energy_scale for b in selection.met_branches)
        raw = replace(raw, met_pt=np.hypot(px, py), met_phi=np.arctan2(py, px), soft_met=None)
    if schema.lumi_block_branch is not None and schema.lumi_block_branch in arrays.fields:
        raw = replace(
            raw, lumi_block=_per_event(arrays, schema.lumi_block_branch, path).astype(np.int64)
        )
    raw, dropped = drop_non_finite(raw)
    n_outside = 0
    if good_runs is not None:
        assert raw.lumi_block is not None
        certified = good_runs.contains(raw.run, raw.lumi_block)
        n_outside = int(np.count_nonzero(~certified))
        raw = raw.masked(certified)
    chunk = select_objects(raw, selection, plan.btag_working_point, source=path, entry_start=start)
    source_id = file_id(tree_file_uuid(event_tree), path)
    return replace(
        chunk,
        n_outside_good_runs=n_outside,
        lumi_block=raw.lumi_block,
        source_id=source_id,
        key=event_keys(raw.run, raw.lumi_block, raw.event, source_id),
        non_finite=non_finite,
        dropped_non_finite=dropped,
    )


def read_entry_range(
    path: str | Path,
    entry_start: int,
    entry_stop: int,
    schema: str = "auto",
    selection: ObjectSelection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
    good_runs: GoodRunList | None = None,
    file_uuid: str | None = None,
) -> EventChunk:
    """Selected objects of entries [entry_start, entry_stop) of one file (a unit of work).

    With `file_uuid` (the ROOT UUID the work was planned with) the file must be that file
    and hold the whole range: InputFileError otherwise (another copy, a rewritten file).
    """
    selection = selection or ObjectSelection()
    plan, chosen, event_tree = plan_file(str(path), schema, selection, tree, mapping, good_runs)
    if file_uuid is not None and (plan.file_uuid != file_uuid or plan.num_entries < entry_stop):
        raise InputFileError(
            f"input file {path} is not the file that was planned (ROOT UUID {plan.file_uuid}, "
            f"{plan.num_entries} entries; planned {file_uuid}, at least {entry_stop}); give "
            "every node the same copy"
        )
    stop = min(entry_stop, plan.num_entries)
    if not 0 <= entry_start < stop:
        raise InvalidInputError(
            f"entry range {entry_start}..{entry_stop} is outside {path} (0..{plan.num_entries})"
        )
    return _read_range(plan, chosen, event_tree, entry_start, stop, selection, good_runs)


def iterate_events(
    paths: str | Path | Iterable[str | Path],
    schema: str = "auto",
    step_size: int = 100_000,
    max_events: int | None = None,
    selection: ObjectSelection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
    good_runs: GoodRunList | None = None,
) -> Iterator[EventChunk]:
    """Yield chunks of selected objects, at most `step_size` entries each, file after file.

    Every file is checked (schema, branches, entries) before its first chunk is read.
    A read failure raises InputFileError naming the file and the entry range. With a
    good-run list, events outside it are dropped and counted in `n_outside_good_runs`;
    `max_events` counts entries read, before that filter.
    """
    if step_size <= 0:
        raise InvalidInputError(f"step_size must be positive, got {step_size}")
    if max_events is not None and max_events <= 0:
        raise InvalidInputError(f"max_events must be positive or None, got {max_events}")
    selection = selection or ObjectSelection()
    remaining = max_events
    distinct = DistinctFiles()
    for path in _as_paths(paths):
        if remaining is not None and remaining <= 0:
            return
        plan, chosen, event_tree = plan_file(path, schema, selection, tree, mapping, good_runs)
        distinct.check(path, tree_file_uuid(event_tree))
        stop = plan.num_entries if remaining is None else min(plan.num_entries, remaining)
        for start in range(0, stop, step_size):
            end = min(start + step_size, stop)
            yield _read_range(plan, chosen, event_tree, start, end, selection, good_runs)
        if remaining is not None:
            remaining -= stop


def count_certified(
    path: str | Path,
    good_runs: GoodRunList,
    schema: str = "auto",
    selection: ObjectSelection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
) -> tuple[int, int]:
    """(events in the good-run list, entries) of one file, reading only run and lumi block."""
    plan, chosen, event_tree = plan_file(
        str(path), schema, selection or ObjectSelection(), tree, mapping, good_runs
    )
    assert chosen.run_branch is not None
    assert chosen.lumi_block_branch is not None
    certified = 0
    for start in range(0, plan.num_entries, 1_000_000):
        stop = min(start + 1_000_000, plan.num_entries)
        try:
            ids = event_tree.arrays(
                [chosen.run_branch, chosen.lumi_block_branch],
                entry_start=start,
                entry_stop=stop,
                library="ak",
            )
        except Exception as error:
            raise InputFileError(
                f"reading run numbers of entries {start}..{stop} of {path} failed: {error}"
            ) from error
        certified += int(
            np.count_nonzero(
                good_runs.contains(
                    numpy_values(ids[chosen.run_branch], np.int64),
                    numpy_values(ids[chosen.lumi_block_branch], np.int64),
                )
            )
        )
    return certified, plan.num_entries


def concatenate_chunks(chunks: list[EventChunk]) -> EventChunk:
    """Join chunks into one (for small inputs)."""
    if not chunks:
        raise InvalidInputError("no events were read")
    if len(chunks) == 1:
        return chunks[0]
    collections = {n: ak.concatenate([getattr(c, n) for c in chunks]) for n in OBJECT_TYPES}

    def joined(name: str) -> npt.NDArray[Any]:
        return np.concatenate([getattr(c, name) for c in chunks])

    lumi_blocks = [c.lumi_block for c in chunks]
    return replace(
        chunks[0],
        **collections,
        key=np.concatenate([c.keys() for c in chunks]),
        lumi_block=None if any(b is None for b in lumi_blocks) else joined("lumi_block"),
        n_outside_good_runs=sum(c.n_outside_good_runs for c in chunks),
        non_finite=summed_counts(c.non_finite for c in chunks),
        dropped_non_finite=summed_counts(c.dropped_non_finite for c in chunks),
        met_pt=joined("met_pt"),
        met_phi=joined("met_phi"),
        run=joined("run"),
        event=joined("event"),
        weight=joined("weight"),
    )


def load_events(
    paths: str | Path | Iterable[str | Path],
    schema: str = "auto",
    max_events: int | None = None,
    selection: ObjectSelection | None = None,
    *,
    tree: str | None = None,
    mapping: str | Path | None = None,
    good_runs: GoodRunList | None = None,
) -> EventChunk:
    """All selected events of small inputs as one chunk."""
    chunks = iterate_events(
        paths,
        schema,
        step_size=1_000_000,
        max_events=max_events,
        selection=selection,
        tree=tree,
        mapping=mapping,
        good_runs=good_runs,
    )
    return concatenate_chunks(list(chunks))
