"""Synthetic NanoAOD-schema events with injected resonances and their truth.

The background is a mix of Standard-Model-like topologies (QCD multijet, W/Z+jets,
ttbar, photon+jets, diphoton, MET+jets) whose objects have power-law pT spectra, so that
all 7 trigger streams and all 9 leading-pair masses are populated with smoothly falling
spectra. Each injected signal is a resonance X -> a b (any of the 9 pairs) with a
Breit-Wigner mass, isotropic two-body decay boosted to the lab, and optional extra
objects that make the events atypical. Files are written with uproot as TTrees
(``Events``), with `truth.json` beside them. Everything is a function of the seed.
"""

from __future__ import annotations

import itertools
import json
import math
import uuid
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Final, Literal

import awkward as ak
import numpy as np
import numpy.typing as npt
import uproot

from core.errors import InvalidInputError
from core.files import committed_folder, json_text, write_text

FloatArray = npt.NDArray[np.float64]
Lineshape = Literal["breit-wigner", "gaussian"]
LINESHAPES: Final = ("breit-wigner", "gaussian")

PAIR_TYPES: Final = {
    "jj": ("j", "j"),
    "jb": ("j", "b"),
    "bb": ("b", "b"),
    "je": ("j", "e"),
    "be": ("b", "e"),
    "jm": ("j", "m"),
    "bm": ("b", "m"),
    "jg": ("j", "g"),
    "bg": ("b", "g"),
}
"""The 9 searched pairs and the object types of their two members."""

OBJECT_CODES: Final = {"j": "Jet", "b": "Jet", "m": "Muon", "e": "Electron", "g": "Photon"}
EXTRA_TYPES: Final = ("jets", "bjets", "muons", "electrons", "photons")
_EXTRA_CODES: Final = {"jets": "j", "bjets": "b", "muons": "m", "electrons": "e", "photons": "g"}
_REST_MASS: Final = {"m": 0.10566, "e": 0.000511, "g": 0.0}
HARDNESS_POWER: Final = 2.2
"""Every background event has a hardness S >= 1 with P(S > s) = s^-2.2 that scales all its
pT thresholds: hard events are hard in every object, as in a real hard scatter, and the
high-mass tails of all 63 spectra are populated with smoothly falling shapes."""
BACKGROUND_PROCESS: Final = 0
"""`anomscan_process` of background events; signal k (0-based) has k + 1."""


SIGNAL_MET_GEV: Final = 15.0
"""Mean MET (GeV, exponential) of signal events whose decay is fully visible."""


@dataclass(frozen=True)
class SignalSpec:
    """A resonance X -> pair with mass and width in GeV.

    Give `n_events`, or `xsec_pb` (converted with the sample's nominal luminosity).
    `extra` adds objects per event, e.g. ``{"photons": 1}``, drawn with pT 50-300 GeV.
    `lineshape` is the distribution of the true mass: a Breit-Wigner of full width `width`
    (the default) or a Gaussian of standard deviation `width` (a resonance whose observed
    width is the detector's or a fixed fraction of its mass, as the injection tests use).
    `met_gev` is the mean of the events' exponential MET (GeV): 15 for a visible decay,
    hundreds for one that recoils against an invisible particle (the MET stream T1).
    """

    pair: str
    mass: float
    width: float
    n_events: int | None = None
    xsec_pb: float | None = None
    extra: Mapping[str, int] = field(default_factory=dict)
    name: str = ""
    lineshape: Lineshape = "breit-wigner"
    met_gev: float = SIGNAL_MET_GEV

    def label(self) -> str:
        """A readable name such as ``X(2000)->jm``."""
        return self.name or f"X({self.mass:g})->{self.pair}"


DEMO_SIGNALS: Final = (
    SignalSpec("jm", 1500.0, 30.0, n_events=80, extra={"photons": 1, "electrons": 1}),
    SignalSpec("bg", 900.0, 20.0, n_events=80, extra={"muons": 1}),
)
"""The built-in sample's injected truth (`anomscan scan` without data, `anomscan demo`):
X -> jet muon at 1.5 TeV and X -> b photon at 0.9 TeV, widths in GeV."""


@dataclass(frozen=True)
class SampleConfig:
    """What to generate: background size, signals, seed, sqrt(s) in GeV, luminosity in pb^-1.

    `fourjet_fraction` is the share of background events from `FOURJET` (taken from
    qcd_multijet): the 4-jet-triggered multi-jet events whose thresholds sculpt the T7 and T6
    pair masses into a plateau, as in real data. 0 (the default) keeps every sample written
    before it existed byte for byte; the validation (bench/validate_scan.py) uses 0.05.
    """

    n_events: int = 100_000
    seed: int = 1
    signals: tuple[SignalSpec, ...] = ()
    lumi_pb: float = 1000.0
    sqrt_s: float = 13000.0
    events_per_file: int = 1_000_000
    fourjet_fraction: float = 0.0


@dataclass(frozen=True)
class SampleInfo:
    """What was written: the ROOT files, the truth file and the event counts."""

    files: tuple[Path, ...]
    truth_path: Path
    n_background: int
    n_signal: tuple[int, ...]
    lumi_pb: float


@dataclass(frozen=True)
class _Process:
    """A background topology: its share and how its objects are drawn."""

    name: str
    fraction: float
    jets: tuple[float, float, float, float]  # fixed count, Poisson mean, pT min, power
    b_fraction: float = 0.05
    leptons: tuple[int, float, float] = (0, 30.0, 3.0)  # count, pT min, power
    photons: tuple[int, float, float, float] = (0, 0.0, 30.0, 3.0)  # fixed, p(extra), min, power
    met: tuple[float, float] = (15.0, 0.0)  # exponential scale, or (pT min, power) if power > 0


BACKGROUND: Final = (
    _Process("qcd_multijet", 0.48, (2, 1.2, 30.0, 2.6)),
    _Process("qcd_hard", 0.05, (2, 1.5, 120.0, 3.2)),
    _Process("w_jets", 0.14, (1, 1.0, 30.0, 2.8), leptons=(1, 30.0, 2.9), met=(20.0, 3.0)),
    _Process("z_jets", 0.08, (0, 1.2, 30.0, 2.8), leptons=(2, 25.0, 3.0)),
    _Process(
        "ttbar",
        0.08,
        (4, 0.5, 30.0, 2.7),
        b_fraction=0.45,
        leptons=(1, 30.0, 3.0),
        met=(30.0, 3.0),
    ),
    _Process("photon_jets", 0.08, (1, 1.0, 30.0, 2.8), photons=(1, 0.05, 40.0, 2.7)),
    _Process("diphoton", 0.03, (0, 0.8, 30.0, 2.8), photons=(2, 0.0, 30.0, 3.0)),
    _Process("met_jets", 0.04, (1, 1.5, 40.0, 2.6), met=(150.0, 3.5)),
    _Process(
        "w_gamma",
        0.02,
        (1, 1.0, 30.0, 2.8),
        leptons=(1, 30.0, 2.9),
        photons=(1, 0.1, 30.0, 2.8),
        met=(20.0, 3.0),
    ),
)


FOURJET: Final = _Process("qcd_fourjet", 0.0, (4, 0.5, 250.0, 3.5), b_fraction=0.2)
"""Multi-jet events that passed a 4-jet trigger: >= 4 jets, each above 250 GeV times the
event's hardness, pT-ordered by the writer. The threshold on every jet sculpts the leading
pair masses into a plateau: at 400k events with `fourjet_fraction` 0.05, T7/jj is flat at
~21-24 events/GeV from 330 to ~850 GeV and T7/jb at ~10 events/GeV to ~900 GeV before they
fall, well above T7's fit start of 600 GeV (docs/physics-notes.md, "Generator")."""


def background_processes(fourjet_fraction: float) -> tuple[_Process, ...]:
    """The background mix with a share `fourjet_fraction` of `FOURJET` taken from QCD multijet.

    With 0 the mix is `BACKGROUND` itself, so the random draws (and files) are unchanged.
    """
    if fourjet_fraction == 0:
        return BACKGROUND
    multijet, *others = BACKGROUND
    reduced = replace(multijet, fraction=multijet.fraction - fourjet_fraction)
    return (reduced, *others, replace(FOURJET, fraction=fourjet_fraction))


MAX_EVENTS: Final = 1_000_000_000
"""Most events (background + signal) one sample may hold: beyond it the run would not end."""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_config(config: SampleConfig) -> None:
    problems = []
    if not isinstance(config.seed, int) or isinstance(config.seed, bool) or config.seed < 0:
        problems.append(f"seed must be a non-negative integer, got {config.seed!r}")
    if not 0 <= config.n_events <= MAX_EVENTS:
        problems.append(f"n_events must be in [0, {MAX_EVENTS}], got {config.n_events}")
    if not (_finite(config.lumi_pb) and 0 < config.lumi_pb <= 1e9):
        problems.append(f"lumi_pb must be a finite number in (0, 1e9], got {config.lumi_pb}")
    if not (_finite(config.sqrt_s) and 0 < config.sqrt_s <= 1e6):
        problems.append(f"sqrt_s must be a finite number in (0, 1e6] GeV, got {config.sqrt_s}")
    if not 0 < config.events_per_file <= MAX_EVENTS:
        problems.append(
            f"events_per_file must be in [1, {MAX_EVENTS}], got {config.events_per_file}"
        )
    multijet_share = BACKGROUND[0].fraction
    if not (_finite(config.fourjet_fraction) and 0 <= config.fourjet_fraction < multijet_share):
        problems.append(
            f"fourjet_fraction must be a number in [0, {multijet_share}) (it is taken from "
            f"qcd_multijet's share), got {config.fourjet_fraction}"
        )
    for signal in config.signals:
        if not (_finite(signal.met_gev) and signal.met_gev >= 0):
            problems.append(
                f"signal {signal.label()}: met_gev must be a finite number >= 0 GeV, "
                f"got {signal.met_gev}"
            )
        if signal.pair not in PAIR_TYPES:
            problems.append(f"signal pair {signal.pair!r} is not one of {list(PAIR_TYPES)}")
        if not (_finite(signal.mass) and 0 < signal.mass < config.sqrt_s):
            problems.append(
                f"signal mass {signal.mass} GeV must lie in (0, sqrt(s) = {config.sqrt_s} GeV)"
            )
        if not (_finite(signal.width) and 0 <= signal.width <= config.sqrt_s):
            problems.append(
                f"signal width must be a finite number in [0, sqrt(s)] GeV, got {signal.width}"
            )
        if signal.lineshape not in LINESHAPES:
            problems.append(
                f"signal {signal.label()}: lineshape {signal.lineshape!r} is not one of "
                f"{list(LINESHAPES)}"
            )
        if signal.xsec_pb is not None and not _finite(signal.xsec_pb):
            problems.append(
                f"signal {signal.label()}: xsec_pb must be finite, got {signal.xsec_pb}"
            )
        if (signal.n_events is None) == (signal.xsec_pb is None):
            problems.append(f"signal {signal.label()}: give exactly one of n_events or xsec_pb")
        if signal.n_events is not None and signal.n_events < 0:
            problems.append(f"signal {signal.label()}: n_events must be >= 0")
        if signal.xsec_pb is not None and signal.xsec_pb < 0:
            problems.append(f"signal {signal.label()}: xsec_pb must be >= 0")
        for kind, count in signal.extra.items():
            if kind not in EXTRA_TYPES or count < 0:
                problems.append(
                    f"signal {signal.label()}: extra {kind}={count} must name one of "
                    f"{EXTRA_TYPES} with a count >= 0"
                )
    if not problems:
        total = config.n_events + sum(
            signal_event_count(s, config.lumi_pb)
            for s in config.signals
            if (s.n_events is None) != (s.xsec_pb is None)
        )
        if total > MAX_EVENTS:
            problems.append(
                f"the sample would hold {total} events, more than {MAX_EVENTS}; lower n_events, "
                "a signal's size or the luminosity"
            )
    if problems:
        raise InvalidInputError("invalid sample configuration: " + "; ".join(problems))


def signal_event_count(signal: SignalSpec, lumi_pb: float) -> int:
    """Number of events of `signal`: as given, or round(sigma * L)."""
    if signal.n_events is not None:
        return int(signal.n_events)
    assert signal.xsec_pb is not None
    return round(signal.xsec_pb * lumi_pb)


def _power_law(
    rng: np.random.Generator, n: int, minimum: float | FloatArray, power: float
) -> FloatArray:
    """Transverse momenta with dN/dpT ~ pT^-(power+1) above `minimum` (GeV, shared or per draw)."""
    return minimum * rng.random(n) ** (-1.0 / power)


class _Objects:
    """Flat per-object arrays for one collection, with their event index."""

    def __init__(self) -> None:
        self.parts: list[dict[str, npt.NDArray[np.generic]]] = []

    def add(
        self,
        rng: np.random.Generator,
        owner: npt.NDArray[np.int64],
        pt: FloatArray,
        code: str,
        *,
        eta: FloatArray | None = None,
        phi: FloatArray | None = None,
        mass: FloatArray | None = None,
    ) -> None:
        n = len(owner)
        eta = rng.normal(0.0, 1.3, n) if eta is None else eta
        phi = rng.uniform(-np.pi, np.pi, n) if phi is None else phi
        if mass is None:
            mass = pt * rng.uniform(0.04, 0.15, n) if code in "jb" else np.full(n, _REST_MASS[code])
        part: dict[str, npt.NDArray[np.generic]] = {
            "owner": owner,
            "pt": pt,
            "eta": eta,
            "phi": phi,
            "mass": mass,
        }
        if code in "jb":
            score = rng.beta(5.0, 1.0, n) if code == "b" else rng.beta(1.0, 20.0, n)
            part["btagDeepFlavB"] = score
        if code in "me":
            part["charge"] = rng.choice(np.array([-1, 1], dtype=np.int32), n)
        self.parts.append(part)

    def jagged(self, n_events: int, fields: tuple[str, ...]) -> ak.Array:
        """Records sorted by event then decreasing pT, as float32/int32 NanoAOD branches."""
        if self.parts:
            merged = {k: np.concatenate([p[k] for p in self.parts]) for k in self.parts[0]}
        else:
            merged = {"owner": np.zeros(0, dtype=np.int64), "pt": np.zeros(0)}
        order = np.lexsort((-merged["pt"], merged["owner"]))
        counts = np.bincount(merged["owner"][order], minlength=n_events)
        columns = {}
        for name in fields:
            values = merged.get(name, np.zeros(len(order)))[order]
            dtype = np.int32 if name == "charge" else np.float32
            columns[name] = ak.unflatten(values.astype(dtype), counts)
        return ak.zip(columns)


def _add_background(
    rng: np.random.Generator,
    n: int,
    offset: int,
    collections: dict[str, _Objects],
    processes: tuple[_Process, ...] = BACKGROUND,
) -> tuple[FloatArray, FloatArray]:
    """Draw `n` background events of the mix `processes` from event index `offset`.

    Returns MET pt and phi.
    """
    process = rng.choice(len(processes), n, p=[p.fraction for p in processes])
    hardness = _power_law(rng, n, 1.0, HARDNESS_POWER)
    met_pt = np.empty(n)
    for k, spec in enumerate(processes):
        index = np.flatnonzero(process == k)
        events = index + offset
        scale = hardness[index]
        fixed, mean, jet_min, jet_power = spec.jets
        n_jets = int(fixed) + rng.poisson(mean, len(index))
        owner = np.repeat(events, n_jets)
        is_b = rng.random(len(owner)) < spec.b_fraction
        pt = _power_law(rng, len(owner), jet_min * np.repeat(scale, n_jets), jet_power)
        collections["Jet"].add(rng, owner[~is_b], pt[~is_b], "j")
        collections["Jet"].add(rng, owner[is_b], pt[is_b], "b")
        n_leptons, lepton_min, lepton_power = spec.leptons
        if n_leptons:
            flavour_is_muon = rng.random(len(index)) < 0.5
            owner = np.repeat(events, n_leptons)
            muon = np.repeat(flavour_is_muon, n_leptons)
            minimum = lepton_min * np.repeat(scale, n_leptons)
            pt = _power_law(rng, len(owner), minimum, lepton_power)
            collections["Muon"].add(rng, owner[muon], pt[muon], "m")
            collections["Electron"].add(rng, owner[~muon], pt[~muon], "e")
        n_photons, p_extra, photon_min, photon_power = spec.photons
        if n_photons or p_extra:
            counts = n_photons + (rng.random(len(index)) < p_extra)
            owner = np.repeat(events, counts)
            minimum = photon_min * np.repeat(scale, counts)
            collections["Photon"].add(
                rng, owner, _power_law(rng, len(owner), minimum, photon_power), "g"
            )
        met_scale, met_power = spec.met
        met_pt[index] = (
            _power_law(rng, len(index), met_scale * scale, met_power)
            if met_power > 0
            else rng.exponential(met_scale * scale)
        )
    return met_pt, rng.uniform(-np.pi, np.pi, n)


def _boost(
    rest: tuple[FloatArray, FloatArray, FloatArray, FloatArray],
    beta: tuple[FloatArray, FloatArray, FloatArray],
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Lorentz-boost four-vectors (px, py, pz, E) from the rest frame by velocity `beta`."""
    px, py, pz, energy = rest
    bx, by, bz = beta
    b2 = bx**2 + by**2 + bz**2
    gamma = 1.0 / np.sqrt(1.0 - b2)
    bp = bx * px + by * py + bz * pz
    factor = np.where(b2 > 0, (gamma - 1.0) * bp / np.where(b2 > 0, b2, 1.0), 0.0)
    return (
        px + factor * bx + gamma * bx * energy,
        py + factor * by + gamma * by * energy,
        pz + factor * bz + gamma * bz * energy,
        gamma * (energy + bp),
    )


def resonance_decays(
    rng: np.random.Generator,
    n: int,
    mass: float,
    width: float,
    lineshape: Lineshape = "breit-wigner",
) -> tuple[FloatArray, tuple[FloatArray, ...], tuple[FloatArray, ...]]:
    """Draw `n` decays X -> 1 2 of massless daughters: (true masses, daughter 1, daughter 2).

    Daughters are (pt, eta, phi) in the lab. X has a Breit-Wigner mass truncated at
    +-5 widths (or, with `lineshape` "gaussian", a Gaussian mass of standard deviation
    `width`), pT from an exponential of mean 0.1 m, rapidity ~ N(0, 0.8), and decays
    isotropically in its rest frame. Masses never go below 1 GeV.
    """
    if width > 0 and lineshape == "gaussian":
        masses = np.maximum(mass + width * rng.standard_normal(n), 1.0)
    elif width > 0:
        angle = (rng.random(n) - 0.5) * 2.0 * np.arctan(10.0)
        masses = np.maximum(mass + 0.5 * width * np.tan(angle), 1.0)
    else:
        masses = np.full(n, mass)
    pt = rng.exponential(0.1 * mass, n)
    rapidity = rng.normal(0.0, 0.8, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    transverse_mass = np.sqrt(masses**2 + pt**2)
    energy = transverse_mass * np.cosh(rapidity)
    beta = (
        pt * np.cos(phi) / energy,
        pt * np.sin(phi) / energy,
        transverse_mass * np.sinh(rapidity) / energy,
    )
    cos_theta = rng.uniform(-1.0, 1.0, n)
    sin_theta = np.sqrt(1.0 - cos_theta**2)
    azimuth = rng.uniform(-np.pi, np.pi, n)
    momentum = masses / 2.0
    direction = (sin_theta * np.cos(azimuth), sin_theta * np.sin(azimuth), cos_theta)
    daughters = []
    for sign in (1.0, -1.0):
        px, py, pz, _ = _boost(
            (
                sign * momentum * direction[0],
                sign * momentum * direction[1],
                sign * momentum * direction[2],
                momentum,
            ),
            beta,
        )
        daughter_pt = np.hypot(px, py)
        daughters.append((daughter_pt, np.arcsinh(pz / daughter_pt), np.arctan2(py, px)))
    return masses, daughters[0], daughters[1]


def _add_signal(
    rng: np.random.Generator,
    signal: SignalSpec,
    events: npt.NDArray[np.int64],
    collections: dict[str, _Objects],
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """Draw the signal events at indices `events`; return true masses, MET pt, MET phi."""
    n = len(events)
    masses, first, second = resonance_decays(rng, n, signal.mass, signal.width, signal.lineshape)
    for code, (pt, eta, phi) in zip(PAIR_TYPES[signal.pair], (first, second), strict=True):
        mass = np.zeros(n) if code in "jb" else None
        collections[OBJECT_CODES[code]].add(rng, events, pt, code, eta=eta, phi=phi, mass=mass)
    soft = rng.poisson(0.5, n)
    owner = np.repeat(events, soft)
    collections["Jet"].add(rng, owner, _power_law(rng, len(owner), 30.0, 3.0), "j")
    for kind, count in signal.extra.items():
        code = _EXTRA_CODES[kind]
        owner = np.repeat(events, count)
        collections[OBJECT_CODES[code]].add(rng, owner, rng.uniform(50.0, 300.0, len(owner)), code)
    return masses, rng.exponential(signal.met_gev, n), rng.uniform(-np.pi, np.pi, n)


_FIELDS: Final = {
    "Jet": ("pt", "eta", "phi", "mass", "btagDeepFlavB"),
    "Muon": ("pt", "eta", "phi", "mass", "charge"),
    "Electron": ("pt", "eta", "phi", "mass", "charge"),
    "Photon": ("pt", "eta", "phi", "mass"),
}


def generate_events(
    n_background: int,
    signals: tuple[tuple[SignalSpec, int], ...],
    rng: np.random.Generator,
    first_event: int = 0,
    fourjet_fraction: float = 0.0,
) -> tuple[dict[str, ak.Array | npt.NDArray[np.generic]], list[tuple[Any, FloatArray]]]:
    """Draw one block of events: NanoAOD branches (shuffled) and per-signal truth.

    The truth of each signal is its event indices in the block and true masses (GeV);
    `fourjet_fraction` as in `SampleConfig`.
    """
    n_total = n_background + sum(n for _, n in signals)
    collections = {name: _Objects() for name in _FIELDS}
    met_pt = np.empty(n_total)
    met_phi = np.empty(n_total)
    process = np.zeros(n_total, dtype=np.int32)
    slots = rng.permutation(n_total)
    background_events = slots[:n_background]
    met_bkg, phi_bkg = _add_background(
        rng, n_background, 0, collections, background_processes(fourjet_fraction)
    )
    # background was drawn at indices 0..n_background-1: remap owners to their shuffled slots
    for objects in collections.values():
        for part in objects.parts:
            part["owner"] = background_events[part["owner"]]
    met_pt[background_events] = met_bkg
    met_phi[background_events] = phi_bkg
    true_masses = []
    start = n_background
    for k, (signal, count) in enumerate(signals):
        events = slots[start : start + count]
        masses, met_sig, phi_sig = _add_signal(rng, signal, events, collections)
        met_pt[events], met_phi[events] = met_sig, phi_sig
        process[events] = k + 1
        true_masses.append((events, masses))
        start += count
    branches: dict[str, ak.Array | npt.NDArray[np.generic]] = {
        "run": np.ones(n_total, dtype=np.uint32),
        "luminosityBlock": ((first_event + np.arange(n_total)) // 10_000 + 1).astype(np.uint32),
        "event": np.arange(first_event, first_event + n_total, dtype=np.uint64) + 1,
        "genWeight": np.ones(n_total, dtype=np.float32),
        "MET_pt": met_pt.astype(np.float32),
        "MET_phi": met_phi.astype(np.float32),
        "anomscan_process": process,
    }
    for name, fields in _FIELDS.items():
        branches[name] = collections[name].jagged(n_total, fields)
    return branches, true_masses


def _split(total: int, parts: int) -> list[int]:
    base, rest = divmod(total, parts)
    return [base + (1 if k < rest else 0) for k in range(parts)]


def _uuids(name: str) -> Callable[[], uuid.UUID]:
    """Deterministic ROOT UUIDs for one file (same sample, same bytes, same event keys)."""
    counter = itertools.count()
    return lambda: uuid.uuid5(uuid.NAMESPACE_OID, f"anomscan.synth:{name}:{next(counter)}")


def write_nanoaod(
    path: Path,
    branches: Mapping[str, ak.Array | npt.NDArray[np.generic]],
    metadata: str,
    identity: str | None = None,
) -> None:
    """Write branches as a NanoAOD-like TTree ``Events`` (counters ``nJet`` ...) plus metadata.

    `identity` seeds the file's ROOT UUID (the events' source in their keys); random if None.
    """
    options: dict[str, Any] = {"compression": uproot.ZLIB(1)}
    if identity is not None:
        options["uuid_function"] = _uuids(identity)
    with uproot.recreate(path, **options) as file:
        types = {
            name: (value.type.content if isinstance(value, ak.Array) else value.dtype)
            for name, value in branches.items()
        }
        file.mktree("Events", types, counter_name=lambda name: f"n{name}")
        file["Events"].extend(dict(branches))
        file["anomscan_metadata"] = metadata


def generate_sample(
    output_dir: str | Path,
    config: SampleConfig,
    progress: Callable[[int, int], None] | None = None,
) -> SampleInfo:
    """Write the synthetic sample of `config` into `output_dir` and return what was written.

    Signal events are spread evenly over the files and shuffled among the background.
    `truth.json` lists, per signal, its specification, event count, event numbers and the
    true masses; both it and every file carry the nominal luminosity (pb^-1), and so does
    the folder's manifest.json (with the event count), from which `anomscan scan DIR` takes it.

    The whole folder is committed at once (`core.files.committed_folder`, manifest last):
    an interrupted run leaves the previous sample whole, a rerun with fewer files leaves no
    old file behind, and a folder holding files anomscan did not write is refused.
    `progress(events_written, events_total)` is called after each file.
    """
    _check_config(config)
    output = Path(output_dir)
    if output.exists() and not output.is_dir():
        raise InvalidInputError(
            f"cannot write the sample to {output}: it is a file; give a folder (-o DIR)"
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InvalidInputError(
            f"cannot create the folder of {output} ({error.strerror}); choose another -o"
        ) from error
    if output.is_dir() and not any(output.iterdir()):
        output.rmdir()  # an empty folder given by the user: ours to fill
    info: dict[str, object] = {"seed": config.seed, "lumi_pb": config.lumi_pb}
    with committed_folder(output, what="synthetic sample", info=info) as staging:
        written = _write_sample(staging, config, progress)
        info["n_events"] = written.n_background + sum(written.n_signal)
    return replace(
        written,
        files=tuple(output / p.name for p in written.files),
        truth_path=output / written.truth_path.name,
    )


def signal_record(signal: SignalSpec) -> dict[str, Any]:
    """A signal's specification as plain data, without the default lineshape and MET.

    Samples written before the option existed so keep their bytes (and their events' keys).
    """
    record = asdict(signal)
    if signal.lineshape == "breit-wigner":
        del record["lineshape"]
    if signal.met_gev == SIGNAL_MET_GEV:
        del record["met_gev"]
    return record


def _write_sample(
    output: Path, config: SampleConfig, progress: Callable[[int, int], None] | None
) -> SampleInfo:
    signal_counts = [signal_event_count(s, config.lumi_pb) for s in config.signals]
    n_total = config.n_events + sum(signal_counts)
    n_files = max(1, -(-n_total // config.events_per_file))
    background_split = _split(config.n_events, n_files)
    signal_split = [_split(c, n_files) for c in signal_counts]
    metadata = {
        "generator": "anomscan.core.synth",
        "seed": config.seed,
        "lumi_pb": config.lumi_pb,
        "sqrt_s": config.sqrt_s,
        "n_background": config.n_events,
        **({"fourjet_fraction": config.fourjet_fraction} if config.fourjet_fraction else {}),
        "signals": [signal_record(s) | {"label": s.label()} for s in config.signals],
    }
    truth_signals: list[dict[str, object]] = [
        {
            "spec": signal_record(s),
            "label": s.label(),
            "process": k + 1,
            "n_events": c,
            "events": [],
            "true_mass": [],
        }
        for k, (s, c) in enumerate(zip(config.signals, signal_counts, strict=True))
    ]
    files = []
    first_event = 0
    for index in range(n_files):
        rng = np.random.default_rng([config.seed, index])
        block_signals = tuple(
            (s, split[index]) for s, split in zip(config.signals, signal_split, strict=True)
        )
        branches, truths = generate_events(
            background_split[index], block_signals, rng, first_event, config.fourjet_fraction
        )
        path = output / f"synthetic_{index:03d}.root"
        identity = json.dumps([metadata, index], sort_keys=True, default=str)
        write_nanoaod(path, branches, json.dumps(metadata), identity)
        files.append(path)
        event = np.asarray(branches["event"])
        for truth, (indices, masses) in zip(truth_signals, truths, strict=True):
            truth["events"] += event[indices].tolist()
            truth["true_mass"] += masses.round(3).tolist()
        first_event += len(event)
        if progress is not None:
            progress(first_event, n_total)
    truth_path = output / "truth.json"
    write_text(
        truth_path,
        json_text(metadata | {"files": [p.name for p in files], "truth": truth_signals}, indent=1),
        what="truth file",
    )
    return SampleInfo(
        tuple(files), truth_path, config.n_events, tuple(signal_counts), config.lumi_pb
    )


def load_truth(path: str | Path) -> dict[str, object]:
    """Read a `truth.json` written by `generate_sample`."""
    path = Path(path)
    if path.is_dir():
        path = path / "truth.json"
    if not path.is_file():
        raise InvalidInputError(f"no truth file at {path}; generate the sample first")
    truth: dict[str, object] = json.loads(path.read_text())
    return truth
