"""Rapidity-Mass Matrices (RMM) of events, a whole chunk at a time (PHYSICS.md section 2).

Per event a 36x36 dimensionless matrix: index 0 is MET, then blocks of light jets, b-jets,
muons, electrons and photons, each pT-ordered and truncated to its block size. Upper
triangle: masses and transverse masses over sqrt(s); lower triangle and column 0:
C (cosh(dy/2) - 1) and C (cosh(y) - 1); diagonal: E_T over sqrt(s) or its relative drop.
The autoencoder sees the row-major flattening without the 9 blinded leading-pair masses.
The cells are filled by a per-event loop compiled with numba when numba is installed, else
by numpy operations over all objects of the chunk; both give the same float32 matrices.
"""

from __future__ import annotations

import functools
import importlib
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Literal

import awkward as ak
import numpy as np
import numpy.typing as npt

from core.errors import InvalidInputError
from core.objects import OBJECT_FIELDS, OBJECT_TYPES, EventChunk

FloatArray = npt.NDArray[np.float64]
IntArray = npt.NDArray[np.int64]

BLINDED_PAIRS: Final = (
    ("jets", "jets"),
    ("jets", "bjets"),
    ("bjets", "bjets"),
    ("jets", "muons"),
    ("bjets", "muons"),
    ("jets", "electrons"),
    ("bjets", "electrons"),
    ("jets", "photons"),
    ("bjets", "photons"),
)
"""The leading-object pairs whose masses are searched, in PHYSICS.md section 2 order."""

BLINDED_PAIR_NAMES: Final = ("jj", "jb", "bb", "jm", "bm", "je", "be", "jg", "bg")
"""Short names of `BLINDED_PAIRS`; note that `core.masses.PAIRS` (section 3) orders them
jj, jb, bb, je, be, jm, bm, jg, bg: map by name, not by position."""


@dataclass(frozen=True)
class RMMLayout:
    """Configuration of the RMM: block sizes per object type, sqrt(s) in GeV, C, MET threshold.

    MET below `met_threshold_gev` counts as 0 (it is usually already zeroed by the selection).
    """

    n_jets: int = 10
    n_bjets: int = 10
    n_muons: int = 5
    n_electrons: int = 5
    n_photons: int = 5
    sqrt_s: float = 13000.0
    rapidity_scale: float = 0.15
    met_threshold_gev: float = 30.0

    def __post_init__(self) -> None:
        sizes = self.block_sizes
        if any(size < 1 for size in sizes):
            raise InvalidInputError(
                f"RMM block sizes must be >= 1, found {dict(zip(OBJECT_TYPES, sizes, strict=True))}"
            )
        if len(sizes) < 2 or sizes[0] < 2:
            raise InvalidInputError(
                f"the RMM needs at least 2 light-jet slots for m_jj, found n_jets={self.n_jets}"
            )
        if not (math.isfinite(self.sqrt_s) and self.sqrt_s > 0):
            raise InvalidInputError(f"sqrt_s must be a positive number of GeV, found {self.sqrt_s}")
        if not (math.isfinite(self.rapidity_scale) and self.rapidity_scale > 0):
            raise InvalidInputError(
                f"the rapidity scale C must be positive (PHYSICS.md: 0.15), "
                f"found {self.rapidity_scale}"
            )
        if not (math.isfinite(self.met_threshold_gev) and self.met_threshold_gev >= 0):
            raise InvalidInputError(
                f"met_threshold_gev must be >= 0 GeV, found {self.met_threshold_gev}"
            )

    @property
    def block_sizes(self) -> tuple[int, ...]:
        """Slots per object type, in `OBJECT_TYPES` order."""
        return (self.n_jets, self.n_bjets, self.n_muons, self.n_electrons, self.n_photons)

    @property
    def block_starts(self) -> dict[str, int]:
        """Matrix index of the first slot of each object type (MET is index 0)."""
        starts = 1 + np.concatenate([[0], np.cumsum(self.block_sizes)[:-1]])
        return {name: int(start) for name, start in zip(OBJECT_TYPES, starts, strict=True)}

    @property
    def size(self) -> int:
        """Matrix dimension: 1 (MET) plus all object slots (36 by default)."""
        return 1 + sum(self.block_sizes)

    @property
    def blinded_cells(self) -> tuple[tuple[int, int], ...]:
        """(row, column) of the leading-pair masses hidden from the autoencoder."""
        starts = self.block_starts
        cells = []
        for first, second in BLINDED_PAIRS:
            offset = 1 if first == second else 0
            cells.append((starts[first], starts[second] + offset))
        return tuple(cells)

    @property
    def n_features(self) -> int:
        """Length of the autoencoder input: size^2 minus the blinded cells (1287 by default)."""
        return self.size * self.size - len(self.blinded_cells)

    @functools.cached_property
    def feature_runs(self) -> tuple[tuple[int, int], ...]:
        """Row-major [start, stop) ranges of flat matrix cells kept as autoencoder features."""
        blinded = sorted(row * self.size + column for row, column in self.blinded_cells)
        starts = [0, *(index + 1 for index in blinded)]
        stops = [*blinded, self.size * self.size]
        return tuple((a, b) for a, b in zip(starts, stops, strict=True) if b > a)


DEFAULT_LAYOUT: Final = RMMLayout()
"""The RMM of PHYSICS.md: 36x36 at sqrt(s) = 13 TeV with C = 0.15."""

BLINDED_CELLS: Final = DEFAULT_LAYOUT.blinded_cells
"""The 9 blinded cells of the default 36x36 RMM, (row, column) 0-based, in the order of
`BLINDED_PAIR_NAMES` (PHYSICS.md section 2): [1,2] jj ... [11,31] bg."""

MAX_ABS_RAPIDITY: Final = 20.0
"""Objects beyond this |rapidity| are rejected as unphysical (cosh must stay finite)."""


@dataclass(frozen=True)
class _Kinematics:
    """Four-momenta of a flat list of objects in GeV, with cosh(y) and e^(y/2) of the rapidity.

    With m_T^2 = pt^2 + sign(m) m^2: E = m_T cosh(y) and E + pz = m_T e^y, so the RMM needs
    no logarithm; cosh((y_i - y_k)/2) = (r + 1/r)/2 with r = e^(y_i/2) / e^(y_k/2).
    """

    px: FloatArray
    py: FloatArray
    pz: FloatArray
    energy: FloatArray
    transverse_energy: FloatArray
    cosh_rapidity: FloatArray
    exp_half_rapidity: FloatArray


_KINEMATIC_FIELDS: Final = (
    "px",
    "py",
    "pz",
    "energy",
    "transverse_energy",
    "cosh_rapidity",
    "exp_half_rapidity",
)


@dataclass(frozen=True)
class _Collection:
    """One collection flattened over events, validated, with its kinematics."""

    name: str
    counts: IntArray
    local: IntArray
    kinematics: _Kinematics


def _describe_event(chunk: EventChunk, index: int) -> str:
    where = f"entry {chunk.entry_start + index}"
    if chunk.source:
        where += f" of {chunk.source}"
    return f"event {int(chunk.event[index])} ({where})"


def _flat_field(collection: ak.Array, field: str) -> FloatArray:
    return np.asarray(ak.to_numpy(ak.flatten(collection[field], axis=1)), dtype=np.float64)


def _check_event_fields(chunk: EventChunk) -> None:
    n = len(chunk)
    for name, values in (("met_pt", chunk.met_pt), ("met_phi", chunk.met_phi)):
        if len(values) != n:
            raise InvalidInputError(
                f"{name} has {len(values)} entries but the chunk has {n} events; "
                "build chunks with core.objects.chunk_from_lists or the readers"
            )
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InvalidInputError(
                f"{_describe_event(chunk, int(bad[0]))}: {name} = {values[bad[0]]}; expected a "
                "finite number; drop or repair the event before computing RMMs"
            )
    negative = np.flatnonzero(chunk.met_pt < 0)
    if negative.size:
        raise InvalidInputError(
            f"{_describe_event(chunk, int(negative[0]))}: met_pt = {chunk.met_pt[negative[0]]} "
            "GeV; expected MET >= 0; check the reader's MET branch"
        )


def _check(
    chunk: EventChunk,
    owner: IntArray,
    is_bad: npt.NDArray[np.bool_],
    what: str,
    values: FloatArray,
    pt: FloatArray,
    why: str,
) -> None:
    """Raise InvalidInputError for the first object flagged in `is_bad`, naming its event."""
    bad = np.flatnonzero(is_bad)
    if bad.size:
        first = int(bad[0])
        raise InvalidInputError(
            f"{_describe_event(chunk, int(owner[first]))}: {what} = {values[first]} "
            f"(pt = {pt[first]} GeV): {why}"
        )


def _validated_collection(chunk: EventChunk, name: str) -> _Collection:
    """Flatten collection `name`, check every object and compute its kinematics.

    E_T = E pt / |p| = E / cosh(eta); the true rapidity y = 0.5 ln((E+pz)/(E-pz)) enters
    through cosh(y) = E / m_T and e^|y| = (E + |pz|) / m_T, m_T^2 = pt^2 + sign(m) m^2.
    """
    n = len(chunk)
    collection = chunk.collection(name)
    counts = np.asarray(ak.to_numpy(ak.num(collection, axis=1)), dtype=np.int64)
    if len(counts) != n:
        raise InvalidInputError(
            f"collection {name!r} has {len(counts)} events but the chunk has {n}"
        )
    owner = np.repeat(np.arange(n, dtype=np.int64), counts)
    pt, eta, phi, mass = (_flat_field(collection, field) for field in OBJECT_FIELDS)

    def refuse(is_bad: npt.NDArray[np.bool_], field: str, values: FloatArray, why: str) -> None:
        _check(chunk, owner, is_bad, f"{name}.{field}", values, pt, why)

    for field, values in zip(OBJECT_FIELDS, (pt, eta, phi, mass), strict=True):
        finite = np.isfinite(values)
        refuse(~finite, field, values, "expected finite kinematics; drop or repair the event")
    refuse(
        pt <= 0,
        "pt",
        pt,
        "expected pt > 0 GeV (an object with pt = 0 has no direction); drop the object",
    )
    with np.errstate(over="ignore", divide="ignore"):
        exp_eta = np.exp(eta)
        cosh_eta = 0.5 * (exp_eta + 1.0 / exp_eta)
        pz = 0.5 * pt * (exp_eta - 1.0 / exp_eta)
        signed_m_squared = np.sign(mass) * mass * mass
        p = pt * cosh_eta
        e_squared = p * p + signed_m_squared
        overflow = ~np.isfinite(4.0 * e_squared)
    refuse(overflow, "eta", eta, "the momentum overflows; expected a physical |eta| and pt")
    refuse(
        e_squared < 0,
        "mass",
        mass,
        "E^2 = p^2 - mass^2 < 0 (negative energy); expected |mass| < p when mass < 0",
    )
    mt_squared = pt * pt + signed_m_squared
    refuse(
        mt_squared <= 0,
        "mass",
        mass,
        "E <= |pz| so the rapidity is undefined; expected pt^2 + sign(m) m^2 > 0",
    )
    energy = np.sqrt(e_squared)
    transverse_mass = np.sqrt(mt_squared)
    cosh_rapidity = energy / transverse_mass
    refuse(
        cosh_rapidity > math.cosh(MAX_ABS_RAPIDITY),
        "eta",
        eta,
        f"the object's rapidity exceeds |y| = {MAX_ABS_RAPIDITY}; drop or repair the object",
    )
    # e^|y| = (E + |pz|) / m_T has no cancellation; e^(y/2) follows from the sign of pz
    exp_half_abs_rapidity = np.sqrt((energy + np.abs(pz)) / transverse_mass)
    exp_half_rapidity = np.where(pz >= 0, exp_half_abs_rapidity, 1.0 / exp_half_abs_rapidity)
    local = np.arange(len(pt), dtype=np.int64) - np.repeat(np.cumsum(counts) - counts, counts)
    rising = np.zeros(len(pt), dtype=np.bool_)
    rising[1:] = (pt[1:] > pt[:-1]) & (local[1:] > 0)
    refuse(
        rising,
        "pt",
        pt,
        "the collection is not sorted by decreasing pt; build it with core.objects.make_collection",
    )
    kinematics = _Kinematics(
        px=pt * np.cos(phi),
        py=pt * np.sin(phi),
        pz=pz,
        energy=energy,
        transverse_energy=energy / cosh_eta,
        cosh_rapidity=cosh_rapidity,
        exp_half_rapidity=exp_half_rapidity,
    )
    return _Collection(name, counts, local, kinematics)


def _validated_collections(chunk: EventChunk) -> list[_Collection]:
    _check_event_fields(chunk)
    return [_validated_collection(chunk, name) for name in OBJECT_TYPES]


def check_kinematics(chunk: EventChunk) -> None:
    """Raise InvalidInputError naming the event and field of any object the RMM can not use.

    Rejected: NaN or infinite pt, eta, phi, mass, MET or MET phi; pt <= 0 GeV; negative MET;
    E^2 = p^2 + sign(m) m^2 < 0 (negative energy); E <= |pz| (rapidity undefined);
    |y| > `MAX_ABS_RAPIDITY`; a collection not sorted by decreasing pt.
    """
    _validated_collections(chunk)


@dataclass(frozen=True)
class _Objects:
    """The objects that enter the matrices, flattened event-major in matrix-slot order."""

    event: IntArray
    slot: IntArray
    kinematics: _Kinematics
    per_event: IntArray
    kinematic_rows: FloatArray
    """The fields of `kinematics` as the rows of one (7, n_objects) array."""


def _selected_objects(n: int, collections: list[_Collection], layout: RMMLayout) -> _Objects:
    """Merge the first block-size objects of each type into one event-major list."""
    kept = [
        np.minimum(c.counts, size) for c, size in zip(collections, layout.block_sizes, strict=True)
    ]
    per_event = np.zeros(n, dtype=np.int64)
    for kept_here in kept:
        per_event += kept_here
    event_start = np.cumsum(per_event) - per_event
    total = int(per_event.sum())
    slot = np.empty(total, dtype=np.int64)
    merged = np.empty((len(_KINEMATIC_FIELDS), total), dtype=np.float64)
    before = np.zeros(n, dtype=np.int64)
    starts = layout.block_starts
    for collection, size, kept_here in zip(collections, layout.block_sizes, kept, strict=True):
        truncated = len(collection.local) > 0 and int(collection.counts.max()) > size
        keep = collection.local < size if truncated else slice(None)
        local = collection.local[keep]
        position = np.repeat(event_start + before, kept_here) + local
        slot[position] = starts[collection.name] + local
        for row, field in enumerate(_KINEMATIC_FIELDS):
            merged[row, position] = getattr(collection.kinematics, field)[keep]
        before += kept_here
    event = np.repeat(np.arange(n, dtype=np.int64), per_event)
    return _Objects(event, slot, _Kinematics(*merged), per_event, merged)


@functools.cache
def _pair_table(max_objects: int) -> tuple[IntArray, IntArray]:
    """All (a, b) with a < b < max_objects, ordered by b: the first c(c-1)/2 cover c objects."""
    second = np.concatenate([np.full(b, b, dtype=np.int64) for b in range(1, max_objects)])
    first = np.concatenate([np.arange(b, dtype=np.int64) for b in range(1, max_objects)])
    return first, second


def _fill_object_cells(
    flat: npt.NDArray[np.float32],
    objects: _Objects,
    met: FloatArray,
    met_phi: FloatArray,
    layout: RMMLayout,
) -> None:
    """Row 0 (m_T with MET), column 0 (C (cosh y - 1)) and the diagonal (E_T) of each object."""
    size, sqrt_s = layout.size, layout.sqrt_s
    kin = objects.kinematics
    event_met = np.take(met, objects.event)
    et = kin.transverse_energy
    mt_squared = (
        (et + event_met) ** 2
        - (kin.px + np.take(met * np.cos(met_phi), objects.event)) ** 2
        - (kin.py + np.take(met * np.sin(met_phi), objects.event)) ** 2
    )
    has_mt = (mt_squared > 0) & (event_met > 0)
    base = objects.event * (size * size)
    flat[base + objects.slot] = np.sqrt(np.where(has_mt, mt_squared, 0.0)) / sqrt_s
    flat[base + objects.slot * size] = layout.rapidity_scale * (kin.cosh_rapidity - 1.0)
    is_block_start = np.zeros(size, dtype=np.bool_)
    is_block_start[list(layout.block_starts.values())] = True
    previous_et = np.roll(et, 1)  # the previous object of the same type unless first of type
    flat[base + objects.slot * (size + 1)] = np.where(
        is_block_start[objects.slot], et / sqrt_s, (previous_et - et) / (previous_et + et)
    )


def _fill_pair_cells(flat: npt.NDArray[np.float32], objects: _Objects, layout: RMMLayout) -> None:
    """Upper triangle m(i,k) / sqrt(s) and lower triangle C (cosh((y_i - y_k)/2) - 1)."""
    per_event = objects.per_event
    pairs_per_event = per_event * (per_event - 1) // 2
    n_pairs = int(pairs_per_event.sum())
    if not n_pairs:
        return
    size = layout.size
    table_first, table_second = _pair_table(size - 1)
    first_object = np.repeat(np.cumsum(per_event) - per_event, pairs_per_event)
    local = np.arange(n_pairs, dtype=np.int64) - np.repeat(
        np.cumsum(pairs_per_event) - pairs_per_event, pairs_per_event
    )
    a = first_object + np.take(table_first, local)
    b = first_object + np.take(table_second, local)
    kin = objects.kinematics
    four_momenta = np.stack([kin.energy, kin.px, kin.py, kin.pz], axis=1)
    total = np.take(four_momenta, a, axis=0) + np.take(four_momenta, b, axis=0)
    total *= total
    m_squared = total[:, 0] - total[:, 1] - total[:, 2] - total[:, 3]
    row_start = objects.event * (size * size) + objects.slot * size
    flat[np.take(row_start, a) + np.take(objects.slot, b)] = (
        np.sign(m_squared) * np.sqrt(np.abs(m_squared)) / layout.sqrt_s
    )
    ratio = np.take(kin.exp_half_rapidity, a) / np.take(kin.exp_half_rapidity, b)
    flat[np.take(row_start, b) + np.take(objects.slot, a)] = layout.rapidity_scale * (
        0.5 * (ratio + 1.0 / ratio) - 1.0
    )


RMMBackend = Literal["auto", "numba", "numpy"]
"""How `rmm_matrices` fills the cells: a compiled per-event loop (numba), whole-chunk numpy
array operations, or "auto" (numba when it can be imported, else numpy). Both give the same
matrices; the validation and the kinematics are shared."""


def fill_cells_per_event(
    matrices: npt.NDArray[np.float32],
    event_start: IntArray,
    slot: IntArray,
    kinematics: FloatArray,
    met: FloatArray,
    met_x: FloatArray,
    met_y: FloatArray,
    is_block_start: npt.NDArray[np.bool_],
    sqrt_s: float,
    rapidity_scale: float,
) -> None:
    """Fill every non-zero cell event by event; compiled by numba (`compiled_fill_cells`).

    Objects of event e are `event_start[e]:event_start[e + 1]` in slot order, `kinematics`
    holds `_KINEMATIC_FIELDS` as rows. The arithmetic is the numpy path's, operation by
    operation, so that both paths give the same float32 cells.
    """
    px = kinematics[0]
    py = kinematics[1]
    pz = kinematics[2]
    energy = kinematics[3]
    transverse_energy = kinematics[4]
    cosh_rapidity = kinematics[5]
    exp_half_rapidity = kinematics[6]
    for event in range(matrices.shape[0]):
        cells = matrices[event]
        event_met = met[event]
        cells[0, 0] = event_met / sqrt_s
        first = event_start[event]
        for b in range(first, event_start[event + 1]):
            k = slot[b]
            et = transverse_energy[b]
            if event_met > 0:
                sum_et = et + event_met
                sum_x = px[b] + met_x[event]
                sum_y = py[b] + met_y[event]
                mt_squared = sum_et * sum_et - sum_x * sum_x - sum_y * sum_y
                if mt_squared > 0:
                    cells[0, k] = math.sqrt(mt_squared) / sqrt_s
            cells[k, 0] = rapidity_scale * (cosh_rapidity[b] - 1.0)
            if is_block_start[k]:
                cells[k, k] = et / sqrt_s
            else:
                previous_et = transverse_energy[b - 1]
                cells[k, k] = (previous_et - et) / (previous_et + et)
            for a in range(first, b):
                i = slot[a]
                total_e = energy[a] + energy[b]
                total_x = px[a] + px[b]
                total_y = py[a] + py[b]
                total_z = pz[a] + pz[b]
                m_squared = (
                    total_e * total_e - total_x * total_x - total_y * total_y - total_z * total_z
                )
                if m_squared >= 0:
                    cells[i, k] = math.sqrt(m_squared) / sqrt_s
                else:
                    cells[i, k] = -math.sqrt(-m_squared) / sqrt_s
                ratio = exp_half_rapidity[a] / exp_half_rapidity[b]
                cells[k, i] = rapidity_scale * (0.5 * (ratio + 1.0 / ratio) - 1.0)


_FillKernel = Callable[
    [
        npt.NDArray[np.float32],
        IntArray,
        IntArray,
        FloatArray,
        FloatArray,
        FloatArray,
        FloatArray,
        npt.NDArray[np.bool_],
        float,
        float,
    ],
    None,
]


@functools.cache
def compiled_fill_cells() -> _FillKernel | None:
    """`fill_cells_per_event` compiled by numba (cached on disk), or None without numba."""
    try:
        numba = importlib.import_module("numba")
    except ImportError:
        return None
    kernel: _FillKernel = numba.njit(cache=True, nogil=True, error_model="numpy")(
        fill_cells_per_event
    )
    return kernel


def numba_available() -> bool:
    """True when numba can be imported, i.e. `rmm_matrices(backend="auto")` uses it."""
    return compiled_fill_cells() is not None


def rmm_matrices(
    chunk: EventChunk,
    sqrt_s: float | None = None,
    *,
    layout: RMMLayout = DEFAULT_LAYOUT,
    backend: RMMBackend = "auto",
) -> npt.NDArray[np.float32]:
    """RMMs of all events of `chunk` as a float32 array (n, size, size); dimensionless.

    `sqrt_s` in GeV overrides `layout.sqrt_s` when given. Invalid kinematics raise
    InvalidInputError naming the event and field (see `check_kinematics`). `backend`
    chooses how the cells are filled (see `RMMBackend`); the result does not depend on it.
    """
    if backend not in ("auto", "numba", "numpy"):
        raise InvalidInputError(f"backend must be 'auto', 'numba' or 'numpy', found {backend!r}")
    kernel = None if backend == "numpy" else compiled_fill_cells()
    if backend == "numba" and kernel is None:
        raise InvalidInputError(
            "backend='numba' was asked for but numba can not be imported; "
            "install it (pip install numba) or use backend='auto' or 'numpy'"
        )
    if sqrt_s is not None:
        layout = replace(layout, sqrt_s=float(sqrt_s))
    events = _PreparedEvents.of(chunk, layout)
    n = len(chunk)
    matrices = np.zeros((n, layout.size, layout.size), dtype=np.float32)
    if kernel is None:
        flat = matrices.reshape(-1)
        matrices[:, 0, 0] = events.met / layout.sqrt_s
        _fill_object_cells(flat, events.objects, events.met, chunk.met_phi, layout)
        _fill_pair_cells(flat, events.objects, layout)
        return matrices
    events.fill(kernel, matrices, 0, n)
    return matrices


@dataclass(frozen=True)
class _PreparedEvents:
    """A chunk's checked kinematics, selected objects and MET: what either path fills from."""

    chunk: EventChunk
    objects: _Objects
    met: FloatArray
    """MET (GeV), 0 below the layout's threshold."""
    layout: RMMLayout

    @classmethod
    def of(cls, chunk: EventChunk, layout: RMMLayout) -> _PreparedEvents:
        """Check the chunk (InvalidInputError naming the event and field) and select."""
        collections = _validated_collections(chunk)
        met = np.where(chunk.met_pt < layout.met_threshold_gev, 0.0, chunk.met_pt)
        return cls(chunk, _selected_objects(len(chunk), collections, layout), met, layout)

    @functools.cached_property
    def _arguments(self) -> tuple[Any, ...]:
        is_block_start = np.zeros(self.layout.size, dtype=np.bool_)
        is_block_start[list(self.layout.block_starts.values())] = True
        event_start = np.zeros(len(self.chunk) + 1, dtype=np.int64)
        np.cumsum(self.objects.per_event, out=event_start[1:])
        met, phi = self.met, self.chunk.met_phi
        return event_start, met, met * np.cos(phi), met * np.sin(phi), is_block_start

    def fill(
        self, kernel: _FillKernel, matrices: npt.NDArray[np.float32], first: int, stop: int
    ) -> None:
        """Fill `matrices` (zeros, one per event) with the RMMs of events [first, stop)."""
        event_start, met, met_x, met_y, is_block_start = self._arguments
        kernel(
            matrices,
            event_start[first : stop + 1],
            self.objects.slot,
            self.objects.kinematic_rows,
            met[first:stop],
            met_x[first:stop],
            met_y[first:stop],
            is_block_start,
            float(self.layout.sqrt_s),
            float(self.layout.rapidity_scale),
        )


FEATURE_BLOCK_EVENTS: Final = 2048
"""Events whose matrices `rmm_feature_rows` holds at a time (10 MB: they stay in cache)."""


def rmm_feature_rows(
    chunk: EventChunk, *, layout: RMMLayout = DEFAULT_LAYOUT
) -> npt.NDArray[np.float32]:
    """`rmm_features(rmm_matrices(chunk))` to the bit, without the chunk's matrices.

    The matrices of `FEATURE_BLOCK_EVENTS` events at a time are filled and their features
    copied out: (n, 1287) floats are held, never (n, 36, 36).
    """
    features = np.empty((len(chunk), layout.n_features), dtype=np.float32)
    for first, stop, matrices in _matrix_blocks(chunk, FEATURE_BLOCK_EVENTS, layout):
        _copy_features(matrices, layout, features[first:stop])
    return features


def rmm_feature_blocks(
    chunk: EventChunk, block_events: int, *, layout: RMMLayout = DEFAULT_LAYOUT
) -> Iterator[tuple[int, int, npt.NDArray[np.float32]]]:
    """(first, stop, features of events [first, stop)) for consecutive blocks of a chunk.

    The features of `rmm_feature_rows`, `block_events` events at a time, in one buffer that
    the next block overwrites: a consumer (the scorer) uses each block before asking for the
    next, and the chunk's features are never held whole.
    """
    if block_events < 1:
        raise InvalidInputError(f"block_events must be >= 1, got {block_events}")
    buffer = np.empty((min(block_events, len(chunk)), layout.n_features), dtype=np.float32)
    for first, stop, matrices in _matrix_blocks(chunk, block_events, layout):
        features = buffer[: stop - first]
        _copy_features(matrices, layout, features)
        yield first, stop, features


def _matrix_blocks(
    chunk: EventChunk, block_events: int, layout: RMMLayout
) -> Iterator[tuple[int, int, npt.NDArray[np.float32]]]:
    """(first, stop, RMMs of events [first, stop)) in blocks, one buffer overwritten.

    Without numba the chunk's matrices are made at once (the numpy path) and sliced.
    """
    kernel = compiled_fill_cells()
    if kernel is None:
        matrices = rmm_matrices(chunk, layout=layout)
        for first in range(0, len(chunk), block_events):
            yield (
                first,
                min(len(chunk), first + block_events),
                matrices[first : first + block_events],
            )
        return
    events = _PreparedEvents.of(chunk, layout)
    n = len(chunk)
    buffer = np.empty((min(block_events, n), layout.size, layout.size), dtype=np.float32)
    for first in range(0, n, block_events):
        stop = min(n, first + block_events)
        matrices = buffer[: stop - first]
        matrices.fill(0.0)
        events.fill(kernel, matrices, first, stop)
        yield first, stop, matrices


def rmm_features(
    matrices: npt.NDArray[np.floating], *, layout: RMMLayout = DEFAULT_LAYOUT
) -> npt.NDArray[np.float32]:
    """Autoencoder inputs (n, 1287): row-major flattened RMMs without the blinded cells."""
    array = np.asarray(matrices)
    expected = (layout.size, layout.size)
    if array.ndim != 3 or array.shape[1:] != expected:
        raise InvalidInputError(
            f"rmm_features expects matrices of shape (n, {layout.size}, {layout.size}), "
            f"found {array.shape}; pass the output of rmm_matrices"
        )
    features = np.empty((len(array), layout.n_features), dtype=np.float32)
    _copy_features(array, layout, features)
    return features


def _copy_features(
    matrices: npt.NDArray[np.floating], layout: RMMLayout, out: npt.NDArray[np.float32]
) -> None:
    """Write the feature cells of `matrices` (n, size, size) into `out` (n, n_features)."""
    flat = matrices.reshape(len(matrices), layout.size * layout.size)
    position = 0
    for start, stop in layout.feature_runs:
        out[:, position : position + stop - start] = flat[:, start:stop]
        position += stop - start


ObjectTuple = tuple[float, float, float, float]
"""One object as (pt GeV, eta, phi, signed mass GeV)."""


@dataclass(frozen=True)
class ReferenceEvent:
    """One event for `rmm_matrix_reference`: objects per type (any order), MET in GeV, MET phi."""

    objects: Mapping[str, Sequence[ObjectTuple]]
    met_pt: float
    met_phi: float


def rmm_matrix_reference(
    event: ReferenceEvent, layout: RMMLayout = DEFAULT_LAYOUT
) -> npt.NDArray[np.float64]:
    """One event's RMM computed cell by cell with plain Python: the slow reference.

    A direct transcription of PHYSICS.md section 2 for tests and benchmarks, independent of
    `rmm_matrices`, writing each cell into a (size, size) float64 array; it assumes valid
    kinematics.
    """
    size = layout.size
    sqrt_s = layout.sqrt_s
    c = layout.rapidity_scale
    rmm = np.zeros((size, size), dtype=np.float64)

    met = event.met_pt if event.met_pt >= layout.met_threshold_gev else 0.0
    met_x = met * math.cos(event.met_phi)
    met_y = met * math.sin(event.met_phi)
    rmm[0, 0] = met / sqrt_s

    vectors: list[tuple[int, float, float, float, float, float]] = []
    index = 1
    for name, block in zip(OBJECT_TYPES, layout.block_sizes, strict=True):
        ordered = sorted(event.objects.get(name, []), key=lambda obj: obj[0], reverse=True)
        previous_et = 0.0
        for rank, (pt, eta, phi, mass) in enumerate(ordered[:block]):
            k = index + rank
            px = pt * math.cos(phi)
            py = pt * math.sin(phi)
            pz = pt * math.sinh(eta)
            p = math.sqrt(px * px + py * py + pz * pz)
            m_squared = mass * mass if mass >= 0 else -(mass * mass)
            e = math.sqrt(p * p + m_squared)
            et = e * pt / p
            y = 0.5 * math.log((e + pz) / (e - pz))
            if rank == 0:
                rmm[k, k] = et / sqrt_s
            else:
                rmm[k, k] = (previous_et - et) / (previous_et + et)
            previous_et = et
            rmm[k, 0] = c * (math.cosh(y) - 1.0)
            if met > 0:
                arg = (et + met) ** 2 - (px + met_x) ** 2 - (py + met_y) ** 2
                rmm[0, k] = math.sqrt(arg) / sqrt_s if arg > 0 else 0.0
            vectors.append((k, e, px, py, pz, y))
        index += block

    for position, (i, e_i, px_i, py_i, pz_i, y_i) in enumerate(vectors):
        for k, e_k, px_k, py_k, pz_k, y_k in vectors[position + 1 :]:
            m2 = (e_i + e_k) ** 2 - (px_i + px_k) ** 2 - (py_i + py_k) ** 2 - (pz_i + pz_k) ** 2
            m = math.sqrt(m2) if m2 >= 0 else -math.sqrt(-m2)
            rmm[i, k] = m / sqrt_s
            rmm[k, i] = c * (math.cosh((y_i - y_k) / 2) - 1.0)
    return rmm


def reference_events(chunk: EventChunk) -> list[ReferenceEvent]:
    """Convert the events of `chunk` to plain Python objects for `rmm_matrix_reference`."""
    lists = {
        name: ak.to_list(ak.zip([chunk.collection(name)[field] for field in OBJECT_FIELDS]))
        for name in OBJECT_TYPES
    }
    return [
        ReferenceEvent(
            objects={name: [tuple(obj) for obj in lists[name][index]] for name in OBJECT_TYPES},
            met_pt=float(chunk.met_pt[index]),
            met_phi=float(chunk.met_phi[index]),
        )
        for index in range(len(chunk))
    ]
