"""Does the autoencoder's anomaly region enrich signal with extra objects? (measurement)

Run (about 2 min per variant on one core at 100k events):
    nice -n 10 .venv/bin/python bench/diagnose_ae_enrichment.py WORK [--events 100000]
        [--signal jm:500:10:60:photons=1,electrons=1 ...] [--variant FLOOR:FRACTION:EPOCHS ...]

Generates a sample (L chosen so that 400k events are 1000 pb^-1, as bench/validate_scan.py),
runs the scan's event pass with a model trained by the train_autoencoder tool, checks that
the table's scores are the exported model's scores of each event's own RMM (joined by event
key) and that the training flags are the model's selection, then, for each variant of the
standardisation floor / training fraction / epochs (trained in-process on the same
features), prints per AR point the share of signal and of background kept in the signal's
stream, and the counts and a counting Z (Asimov, s and b in +-4 % of the mass) in the mass
window. Signal events are found by their event numbers in truth.json. Results go to
WORK/enrichment.json; bench/results/ae_enrichment.md records a run.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import numpy.typing as npt

from agent.runtime.eventpass import PassSpec, event_pass
from core.anomaly import anomaly_region
from core.autoencoder import (
    feature_chunks,
    load_scorer,
    read_model_card,
    train_autoencoder,
    training_selection,
)
from core.events import iterate_events
from core.synth import SampleConfig, SignalSpec, generate_sample, load_truth
from core.table import MASS_COLUMNS, STREAMS, read_event_table
from tools.registry import get_tool

XSEC_POINTS_PB = (0.1, 0.32, 1.0, 3.2, 10.0, 100.0)


def _signal(text: str) -> tuple[SignalSpec, tuple[str, ...]]:
    """pair:mass:width:n[:kind=count,...]@stream[,stream], e.g. jm:500:10:60:photons=1@T2,T3."""
    spec, _, streams = text.partition("@")
    pair, mass, width, n, *rest = spec.split(":")
    extra = {k: int(v) for k, v in (item.split("=") for item in rest[0].split(","))} if rest else {}
    signal = SignalSpec(pair, float(mass), float(width), n_events=int(n), extra=extra)
    return signal, tuple(streams.split(","))


def _asimov_z(s: int, b: int) -> float:
    if s == 0:
        return 0.0
    return math.sqrt(2.0 * ((s + b) * math.log(1.0 + s / max(b, 0.5)) - s))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("work", type=Path)
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument(
        "--signal",
        action="append",
        default=None,
        help="pair:mass:width:n[:extras]@stream",
    )
    parser.add_argument("--variant", action="append", default=None, help="floor:fraction:epochs")
    arguments = parser.parse_args()
    signals = [
        _signal(s)
        for s in (
            arguments.signal
            or ["jm:500:10:60:photons=1,electrons=1@T2", "jj:800:20:60:photons=1,electrons=1@T2"]
        )
    ]
    variants = [
        tuple(float(v) for v in s.split(":")) for s in arguments.variant or ["1e-3:0.01:20"]
    ]
    lumi = 1000.0 * arguments.events / 400_000
    work: Path = arguments.work
    sample = generate_sample(
        work / "data",
        SampleConfig(
            n_events=arguments.events, seed=3, signals=tuple(s for s, _ in signals), lumi_pb=lumi
        ),
    )
    files = [str(p) for p in sample.files]
    model = work / "model" / "autoencoder.onnx"
    model.parent.mkdir(parents=True, exist_ok=True)
    get_tool("train_autoencoder").call(
        {"inputs": files, "output": str(model), "seed": 3, "fraction": 0.01, "max_epochs": 20}
    )
    event_pass(files, work / "events", PassSpec(model=str(model)), executor="serial")
    table = read_event_table(work / "events")
    assert table.score is not None
    assert table.training is not None

    scorer = load_scorer(model)
    parts = [(c.keys(), f, np.asarray(c.event)) for c, f in feature_chunks(iterate_events(files))]
    keys = np.concatenate([k for k, _, _ in parts])
    features = np.concatenate([f for _, f, _ in parts])
    events = np.concatenate([e for _, _, e in parts])
    order = np.argsort(table.keys())
    rows = order[np.searchsorted(table.keys()[order], keys)]
    assert np.array_equal(table.keys()[rows], keys)
    card = read_model_card(model)
    score_difference = float(np.abs(table.score[rows] - scorer.score(features)).max())
    training_agrees = bool(
        np.array_equal(table.training[rows], training_selection(keys, card.fraction, card.seed))
    )
    print(
        f"table vs direct scores: max |diff| {score_difference}; training flags {training_agrees}"
    )

    process: npt.NDArray[np.int64] = np.zeros(len(keys), dtype=np.int64)
    for truth in load_truth(sample.truth_path)["truth"]:  # type: ignore[attr-defined]
        process[np.isin(events, np.asarray(truth["events"]))] = truth["process"]
    bits, masses = table.stream_bits[rows], table.masses[rows]
    results: list[dict[str, object]] = []
    for floor, fraction, epochs in variants:
        picked = training_selection(keys, fraction, 3)
        trained = train_autoencoder(
            features[picked],
            keys[picked],
            seed=3,
            fraction=fraction,
            max_epochs=int(epochs),
            std_floor=floor,
        )
        score = trained.score(features)
        floored = int((trained.feature_scale <= floor * 1.0001).sum())
        print(f"floor {floor:g} fraction {fraction:g} epochs {int(epochs)}: {floored} floored")
        for k, signal, stream in (
            (k, signal, stream)
            for k, (signal, streams) in enumerate(signals, start=1)
            for stream in streams
        ):
            in_stream = bits[:, STREAMS.index(stream)] & ~picked
            mass = masses[:, MASS_COLUMNS.index(f"m_{signal.pair}")]
            window = (mass > 0.96 * signal.mass) & (mass < 1.04 * signal.mass)
            n_signal = int((in_stream & (process == k)).sum())
            n_background = int((in_stream & (process == 0)).sum())
            for xsec_pb in XSEC_POINTS_PB:
                kept = anomaly_region(
                    score, xsec_pb, lumi, in_stream=in_stream, training_fraction=fraction
                ).selected
                s, b = (
                    int((kept & window & (process == k)).sum()),
                    int((kept & window & (process == 0)).sum()),
                )
                row = {
                    "floor": floor,
                    "fraction": fraction,
                    "epochs": int(epochs),
                    "signal": signal.label(),
                    "stream": stream,
                    "xsec_pb": xsec_pb,
                    "signal_share": int((kept & (process == k)).sum()) / max(n_signal, 1),
                    "background_share": int((kept & (process == 0)).sum()) / max(n_background, 1),
                    "window_s": s,
                    "window_b": b,
                    "window_z": _asimov_z(s, b),
                }
                results.append(row)
                print(
                    f"  {signal.label()} {stream} {xsec_pb:g} pb: signal {row['signal_share']:.3f}"
                    f" background {row['background_share']:.4f} window s {s} b {b}"
                    f" Z {row['window_z']:.1f}"
                )
    (work / "enrichment.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
