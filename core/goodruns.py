"""Good-run lists: which (run, luminosity block) pairs are certified for physics.

Two formats: the CMS "golden" JSON (``{"run": [[first_ls, last_ls], ...]}``) and the ATLAS
GRL XML (``<LumiBlockCollection><Run>N</Run><LBRange Start="a" End="b"/>...``). Ranges
are inclusive at both ends, as in both experiments' files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError
from core.files import read_user_text

IntArray = npt.NDArray[np.int64]


@dataclass(frozen=True)
class GoodRunList:
    """Certified luminosity-block ranges per run (inclusive), with where they came from."""

    ranges: Mapping[int, IntArray]
    source: str = ""

    def contains(self, run: npt.ArrayLike, lumi_block: npt.ArrayLike) -> npt.NDArray[np.bool_]:
        """Mask of the events whose (run, luminosity block) is certified."""
        runs = np.asarray(run, dtype=np.int64)
        blocks = np.asarray(lumi_block, dtype=np.int64)
        good = np.zeros(len(runs), dtype=bool)
        for number in np.unique(runs):
            ranges = self.ranges.get(int(number))
            if ranges is None or len(ranges) == 0:
                continue
            here = runs == number
            position = np.searchsorted(ranges[:, 0], blocks[here], side="right") - 1
            inside = position >= 0
            inside[inside] &= blocks[here][inside] <= ranges[position[inside], 1]
            good[here] = inside
        return good

    @property
    def n_runs(self) -> int:
        """Number of runs with at least one certified block."""
        return len(self.ranges)


def _sorted_ranges(pairs: list[tuple[int, int]], where: str) -> IntArray:
    for first, last in pairs:
        if first > last or first < 0:
            raise InvalidInputError(f"good-run list {where}: range [{first}, {last}] is not valid")
    return np.array(sorted(pairs), dtype=np.int64).reshape(-1, 2)


def _from_cms_json(text: str, where: str) -> GoodRunList:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise InvalidInputError(f"good-run list {where} is not valid JSON: {error}") from error
    if not isinstance(data, dict):
        raise InvalidInputError(
            f"good-run list {where}: expected an object {{run: [[first, last], ...]}}"
        )
    ranges = {}
    for run, blocks in data.items():
        if not str(run).isdigit() or not isinstance(blocks, list):
            raise InvalidInputError(
                f"good-run list {where}: entry {run!r} is not 'run': [[first_ls, last_ls], ...]"
            )
        pairs = []
        for block in blocks:
            if not (
                isinstance(block, list)
                and len(block) == 2
                and all(isinstance(b, int) for b in block)
            ):
                raise InvalidInputError(
                    f"good-run list {where}: run {run} has range {block!r}, expected [first, last]"
                )
            pairs.append((block[0], block[1]))
        ranges[int(run)] = _sorted_ranges(pairs, where)
    return GoodRunList(ranges, where)


def _from_atlas_xml(text: str, where: str) -> GoodRunList:
    try:
        root = ElementTree.fromstring(text)
    except ElementTree.ParseError as error:
        raise InvalidInputError(f"good-run list {where} is not valid XML: {error}") from error
    collected: dict[int, list[tuple[int, int]]] = {}
    for collection in root.iter("LumiBlockCollection"):
        run_element = collection.find("Run")
        if run_element is None or not (run_element.text or "").strip().isdigit():
            raise InvalidInputError(f"good-run list {where}: a LumiBlockCollection has no <Run>")
        run = int((run_element.text or "").strip())
        for block in collection.iter("LBRange"):
            try:
                collected.setdefault(run, []).append(
                    (int(block.attrib["Start"]), int(block.attrib["End"]))
                )
            except (KeyError, ValueError) as error:
                raise InvalidInputError(
                    f"good-run list {where}: run {run} has an LBRange without integer Start and End"
                ) from error
    if not collected:
        raise InvalidInputError(f"good-run list {where} holds no LumiBlockCollection with ranges")
    return GoodRunList({r: _sorted_ranges(p, where) for r, p in collected.items()}, where)


def load_good_run_list(path: str | Path) -> GoodRunList:
    """Read a CMS golden JSON or an ATLAS GRL XML (chosen by content, not by suffix)."""
    path = Path(path)
    text = read_user_text(path, "good-run list")
    try:
        if text.lstrip().startswith("<"):
            return _from_atlas_xml(text, str(path))
        return _from_cms_json(text, str(path))
    except (RecursionError, ValueError) as error:
        if isinstance(error, InvalidInputError):
            raise
        raise InvalidInputError(
            f"good-run list {path} can not be read ({type(error).__name__}: {error}); expected "
            "a CMS golden JSON or an ATLAS GRL XML"
        ) from error
