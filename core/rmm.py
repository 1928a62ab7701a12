"""Rapidity-Mass Matrices (RMM) of events, vectorised over events (PHYSICS.md section 2).

Per event a 36x36 dimensionless matrix: index 0 is MET, then blocks of light jets, b-jets,
muons, electrons and photons, each pT-ordered and truncated to its block size. Upper
triangle: masses and transverse masses over sqrt(s); lower triangle and column 0:
C (cosh(dy/2) - 1) and C (cosh(y) - 1); diagonal: E_T over sqrt(s) or its relative drop.
The autoencoder sees the row-major flattening without the 9 blinded leading-pair masses.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Final

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
"""The leading-object pairs whose masses are searched (jj, jb, bb, jm, bm, je, be, jg, bg)."""


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
    def feature_columns(self) -> IntArray:
        """Row-major flat indices of the matrix cells kept as autoencoder features."""
        blinded = {row * self.size + column for row, column in self.blinded_cells}
        return np.array(
            [index for index in range(self.size * self.size) if index not in blinded],
            dtype=np.int64,
        )


DEFAULT_LAYOUT: Final = RMMLayout()
"""The RMM of PHYSICS.md: 36x36 at sqrt(s) = 13 TeV with C = 0.15."""

BLINDED_CELLS: Final = DEFAULT_LAYOUT.blinded_cells
"""The 9 blinded cells of the default 36x36 RMM, (row, column) 0-based, in PHYSICS.md order."""

MAX_ABS_RAPIDITY: Final = 20.0
"""Objects beyond this |rapidity| are rejected as unphysical (cosh must stay finite)."""


@dataclass(frozen=True)
class _Objects:
    """The objects that enter the matrices, flattened event-major in matrix-slot order."""

    event: IntArray
    slot: IntArray
    pt: FloatArray
    eta: FloatArray
    phi: FloatArray
    mass: FloatArray
    per_event: IntArray


def _describe_event(chunk: EventChunk, index: int) -> str:
    where = f"entry {chunk.entry_start + index}"
    if chunk.source:
        where += f" of {chunk.source}"
    return f"event {int(chunk.event[index])} ({where})"


def _flat_field(collection: ak.Array, field: str) -> FloatArray:
    return np.asarray(ak.to_numpy(ak.flatten(collection[field], axis=1)), dtype=np.float64)


def _kinematics(
    pt: FloatArray, eta: FloatArray, phi: FloatArray, mass: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray, FloatArray, FloatArray]:
    """(px, py, pz, E, E_T, y) in GeV of valid objects; y in the cancellation-free form.

    y = 0.5 ln((E+pz)/(E-pz)) = sign(pz) ln((E+|pz|)/m_T), m_T^2 = pt^2 + sign(m) m^2.
    """
    px = pt * np.cos(phi)
    py = pt * np.sin(phi)
    pz = pt * np.sinh(eta)
    signed_m_squared = np.sign(mass) * mass * mass
    p_squared = pt * pt + pz * pz
    energy = np.sqrt(p_squared + signed_m_squared)
    transverse_energy = energy * pt / np.sqrt(p_squared)
    transverse_mass = np.sqrt(pt * pt + signed_m_squared)
    rapidity = np.sign(pz) * np.log((energy + np.abs(pz)) / transverse_mass)
    return px, py, pz, energy, transverse_energy, rapidity


def _check_objects(
    chunk: EventChunk, name: str, owner: IntArray, fields: dict[str, FloatArray]
) -> None:
    for field, values in fields.items():
        bad = np.flatnonzero(~np.isfinite(values))
        if bad.size:
            raise InvalidInputError(
                f"{_describe_event(chunk, int(owner[bad[0]]))}: {name}.{field} = "
                f"{values[bad[0]]}; expected finite kinematics; drop or repair the event"
            )
    pt, eta, mass = fields["pt"], fields["eta"], fields["mass"]
    bad = np.flatnonzero(pt <= 0)
    if bad.size:
        raise InvalidInputError(
            f"{_describe_event(chunk, int(owner[bad[0]]))}: {name}.pt = {pt[bad[0]]} GeV; "
            "expected pt > 0 (an object with pt = 0 has no direction); drop the object"
        )
    with np.errstate(over="ignore"):
        pz = pt * np.sinh(eta)
        four_e_squared = 4.0 * (pt * pt + pz * pz + np.sign(mass) * mass * mass)
    transverse_m_squared = pt * pt + np.sign(mass) * mass * mass
    problems = (
        (
            ~np.isfinite(four_e_squared),
            "eta",
            "the momentum overflows; expected a physical |eta| and pt",
        ),
        (
            four_e_squared < 0,
            "mass",
            "E^2 = p^2 - mass^2 < 0 (negative energy); expected |mass| < p when mass < 0",
        ),
        (
            transverse_m_squared <= 0,
            "mass",
            "E <= |pz| so the rapidity is undefined; expected pt^2 + sign(m) m^2 > 0",
        ),
    )
    for is_bad, field, why in problems:
        bad = np.flatnonzero(is_bad)
        if bad.size:
            first = int(bad[0])
            raise InvalidInputError(
                f"{_describe_event(chunk, int(owner[first]))}: {name}.{field} = "
                f"{fields[field][first]} (pt = {pt[first]} GeV): {why}; drop or repair the object"
            )
    rapidity = _kinematics(pt, eta, fields["phi"], mass)[5]
    bad = np.flatnonzero(np.abs(rapidity) > MAX_ABS_RAPIDITY)
    if bad.size:
        first = int(bad[0])
        raise InvalidInputError(
            f"{_describe_event(chunk, int(owner[first]))}: {name} object with rapidity "
            f"{rapidity[first]:.4g} (eta = {eta[first]}, mass = {mass[first]} GeV); expected "
            f"|y| <= {MAX_ABS_RAPIDITY}; drop or repair the object"
        )
    rising = np.flatnonzero((pt[1:] > pt[:-1]) & (owner[1:] == owner[:-1]))
    if rising.size:
        raise InvalidInputError(
            f"{_describe_event(chunk, int(owner[rising[0]]))}: {name}.pt is not sorted by "
            "decreasing pt; build collections with core.objects.make_collection"
        )


def check_kinematics(chunk: EventChunk) -> None:
    """Raise InvalidInputError naming the event and field of any object the RMM can not use.

    Rejected: NaN or infinite pt, eta, phi, mass, MET or MET phi; pt <= 0 GeV; negative MET;
    E^2 = p^2 + sign(m) m^2 < 0 (negative energy); E <= |pz| (rapidity undefined);
    |y| > `MAX_ABS_RAPIDITY`; a collection not sorted by decreasing pt.
    """
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
    for name in OBJECT_TYPES:
        collection = chunk.collection(name)
        counts = np.asarray(ak.to_numpy(ak.num(collection, axis=1)), dtype=np.int64)
        if len(counts) != n:
            raise InvalidInputError(
                f"collection {name!r} has {len(counts)} events but the chunk has {n}"
            )
        owner = np.repeat(np.arange(n, dtype=np.int64), counts)
        fields = {field: _flat_field(collection, field) for field in OBJECT_FIELDS}
        _check_objects(chunk, name, owner, fields)


def _selected_objects(chunk: EventChunk, layout: RMMLayout) -> _Objects:
    """Flatten the first block-size objects of each type into one event-major list."""
    n = len(chunk)
    blocks = []
    kept_per_event = np.zeros(n, dtype=np.int64)
    for name, size in zip(OBJECT_TYPES, layout.block_sizes, strict=True):
        collection = chunk.collection(name)
        counts = np.asarray(ak.to_numpy(ak.num(collection, axis=1)), dtype=np.int64)
        starts = np.cumsum(counts) - counts
        local = np.arange(int(counts.sum()), dtype=np.int64) - np.repeat(starts, counts)
        keep = local < size
        kept = np.minimum(counts, size)
        fields = [_flat_field(collection, field)[keep] for field in OBJECT_FIELDS]
        blocks.append((name, kept, local[keep], fields))
        kept_per_event += kept
    event_start = np.cumsum(kept_per_event) - kept_per_event
    total = int(kept_per_event.sum())
    event = np.repeat(np.arange(n, dtype=np.int64), kept_per_event)
    slot = np.empty(total, dtype=np.int64)
    values = np.empty((len(OBJECT_FIELDS), total), dtype=np.float64)
    before = np.zeros(n, dtype=np.int64)
    for name, kept, local, fields in blocks:
        position = np.repeat(event_start + before, kept) + local
        slot[position] = layout.block_starts[name] + local
        for row, field in enumerate(fields):
            values[row, position] = field
        before += kept
    pt, eta, phi, mass = values
    return _Objects(event, slot, pt, eta, phi, mass, per_event=kept_per_event)


@functools.cache
def _pair_table(max_objects: int) -> tuple[IntArray, IntArray]:
    """All (a, b) with a < b < max_objects, ordered by b: the first c(c-1)/2 cover c objects."""
    second = np.concatenate([np.full(b, b, dtype=np.int64) for b in range(1, max_objects)])
    first = np.concatenate([np.arange(b, dtype=np.int64) for b in range(1, max_objects)])
    return first, second


def rmm_matrices(
    chunk: EventChunk, sqrt_s: float | None = None, *, layout: RMMLayout = DEFAULT_LAYOUT
) -> npt.NDArray[np.float32]:
    """RMMs of all events of `chunk` as a float32 array (n, size, size); dimensionless.

    `sqrt_s` in GeV overrides `layout.sqrt_s` when given. Invalid kinematics raise
    InvalidInputError naming the event and field (see `check_kinematics`).
    """
    if sqrt_s is not None:
        layout = replace(layout, sqrt_s=float(sqrt_s))
    check_kinematics(chunk)
    n, size = len(chunk), layout.size
    cells = size * size
    matrices = np.zeros((n, size, size), dtype=np.float32)
    flat = matrices.reshape(-1)
    sqrt_s_gev, scale = layout.sqrt_s, layout.rapidity_scale

    met = np.where(chunk.met_pt < layout.met_threshold_gev, 0.0, chunk.met_pt)
    met_x, met_y = met * np.cos(chunk.met_phi), met * np.sin(chunk.met_phi)
    matrices[:, 0, 0] = met / sqrt_s_gev

    objects = _selected_objects(chunk, layout)
    px, py, pz, energy, transverse_energy, rapidity = _kinematics(
        objects.pt, objects.eta, objects.phi, objects.mass
    )
    base = objects.event * cells

    object_met = objects.event
    mt_squared = (
        (transverse_energy + met[object_met]) ** 2
        - (px + met_x[object_met]) ** 2
        - (py + met_y[object_met]) ** 2
    )
    has_mt = (mt_squared > 0) & (met[object_met] > 0)
    flat[base + objects.slot] = np.sqrt(np.where(has_mt, mt_squared, 0.0)) / sqrt_s_gev
    flat[base + objects.slot * size] = scale * (np.cosh(rapidity) - 1.0)

    is_block_start = np.zeros(size, dtype=bool)
    is_block_start[list(layout.block_starts.values())] = True
    leading = is_block_start[objects.slot]
    previous_et = np.roll(transverse_energy, 1)
    diagonal = np.where(
        leading,
        transverse_energy / sqrt_s_gev,
        (previous_et - transverse_energy) / (previous_et + transverse_energy),
    )
    flat[base + objects.slot * (size + 1)] = diagonal

    pairs_per_event = objects.per_event * (objects.per_event - 1) // 2
    n_pairs = int(pairs_per_event.sum())
    if n_pairs:
        table_first, table_second = _pair_table(size - 1)
        pair_event = np.repeat(np.arange(n, dtype=np.int64), pairs_per_event)
        local = np.arange(n_pairs, dtype=np.int64) - np.repeat(
            np.cumsum(pairs_per_event) - pairs_per_event, pairs_per_event
        )
        first_object = np.cumsum(objects.per_event) - objects.per_event
        a = first_object[pair_event] + table_first[local]
        b = first_object[pair_event] + table_second[local]
        m_squared = (
            (energy[a] + energy[b]) ** 2
            - (px[a] + px[b]) ** 2
            - (py[a] + py[b]) ** 2
            - (pz[a] + pz[b]) ** 2
        )
        signed_mass = np.sign(m_squared) * np.sqrt(np.abs(m_squared))
        pair_base = pair_event * cells
        slot_a, slot_b = objects.slot[a], objects.slot[b]
        flat[pair_base + slot_a * size + slot_b] = signed_mass / sqrt_s_gev
        flat[pair_base + slot_b * size + slot_a] = scale * (
            np.cosh(0.5 * (rapidity[a] - rapidity[b])) - 1.0
        )
    return matrices


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
    flat = array.reshape(len(array), -1)
    return np.ascontiguousarray(flat[:, layout.feature_columns], dtype=np.float32)


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
    `rmm_matrices`; it assumes valid kinematics.
    """
    size = layout.size
    sqrt_s = layout.sqrt_s
    c = layout.rapidity_scale
    rmm = [[0.0] * size for _ in range(size)]

    met = event.met_pt if event.met_pt >= layout.met_threshold_gev else 0.0
    met_x = met * math.cos(event.met_phi)
    met_y = met * math.sin(event.met_phi)
    rmm[0][0] = met / sqrt_s

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
                rmm[k][k] = et / sqrt_s
            else:
                rmm[k][k] = (previous_et - et) / (previous_et + et)
            previous_et = et
            rmm[k][0] = c * (math.cosh(y) - 1.0)
            if met > 0:
                arg = (et + met) ** 2 - (px + met_x) ** 2 - (py + met_y) ** 2
                rmm[0][k] = math.sqrt(arg) / sqrt_s if arg > 0 else 0.0
            vectors.append((k, e, px, py, pz, y))
        index += block

    for position, (i, e_i, px_i, py_i, pz_i, y_i) in enumerate(vectors):
        for k, e_k, px_k, py_k, pz_k, y_k in vectors[position + 1 :]:
            m2 = (e_i + e_k) ** 2 - (px_i + px_k) ** 2 - (py_i + py_k) ** 2 - (pz_i + pz_k) ** 2
            m = math.sqrt(m2) if m2 >= 0 else -math.sqrt(-m2)
            rmm[i][k] = m / sqrt_s
            rmm[k][i] = c * (math.cosh((y_i - y_k) / 2) - 1.0)
    return np.array(rmm, dtype=np.float64)


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
