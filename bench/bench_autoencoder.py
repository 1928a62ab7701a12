"""Autoencoder benchmark: training time, scoring throughput, int8 agreement, end-to-end rate.

Run: .venv/bin/python bench/bench_autoencoder.py [--events 1000000] [--threads 1]

Baselines measured in the same run:
- scoring (fp32 and int8) against onnxruntime running only the network's six MatMuls with
  the same weight matrices on the same events ("raw"), same threads;
- end-to-end (read ROOT -> RMM -> score -> Parquet table) against scoring alone.
Writes bench/results/autoencoder.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import TensorProto, helper, numpy_helper

from core.anomaly import XSEC_MAX_PB, XSEC_MIN_PB, log_uniform_xsec_grid
from core.autoencoder import (
    export_onnx,
    feature_chunks,
    load_scorer,
    quantize_int8,
    score_agreement,
    scored_chunks,
    train_autoencoder,
    training_selection,
)
from core.events import iterate_events
from core.masses import STREAMS, stream_bits
from core.objects import EventChunk
from core.rmm import rmm_features, rmm_matrices
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import write_event_table
from tools.autoencoder import subset_chunk

RESULTS = Path(__file__).resolve().parent / "results" / "autoencoder.json"


def raw_matmul_chain(weights: list[np.ndarray], output: Path) -> Path:
    """An ONNX graph of only the MatMuls (in, out) of the network, with its weight matrices."""
    nodes, initializers = [], []
    current = "features"
    for index, matrix in enumerate(weights):
        name = f"w{index}"
        initializers.append(numpy_helper.from_array(np.ascontiguousarray(matrix), name))
        nodes.append(helper.make_node("MatMul", [current, name], [f"h{index}"]))
        current = f"h{index}"
    graph = helper.make_graph(
        nodes,
        "matmul_chain",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["events", None])],
        [helper.make_tensor_value_info(current, TensorProto.FLOAT, ["events", None])],
        initializers,
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), output)
    return output


def rate(function: Any, n_events: int, repeats: int = 3) -> float:
    """Best events/s over `repeats` runs of `function()`."""
    best = np.inf
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return n_events / best


def session(path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _overlap_per_point(
    fp32: np.ndarray, int8: np.ndarray, bits: np.ndarray, lumi_pb: float
) -> dict[str, Any]:
    """Per point of the scan's default grid and per stream: int8's AR overlap with fp32's.

    The scan's AR is per stream, so each stream is cut on its own; `worst` is the lowest
    overlap over the streams whose AR holds at least 100 events (below that one event
    moves the fraction by a percent or more), and `passes_0.99` whether int8 would be
    allowed there (issue 24: overlap >= 0.99 at every point).
    """
    grid = [float(p) for p in log_uniform_xsec_grid(4, XSEC_MIN_PB, XSEC_MAX_PB)]
    table: dict[str, Any] = {}
    for point in grid:
        per_stream = {}
        for k, stream in enumerate(STREAMS):
            inside = bits[:, k]
            (overlap,) = score_agreement(
                fp32[inside], int8[inside], lumi_pb, xsec_points_pb=(point,)
            ).overlaps
            per_stream[stream] = {"selected": overlap.n_selected, "overlap": overlap.fraction}
        counted = [v["overlap"] for v in per_stream.values() if v["selected"] >= 100]
        worst = min(counted) if counted else None
        table[f"{point:g} pb"] = {
            "streams": per_stream,
            "worst": worst,
            "passes_0.99": None if worst is None else worst >= 0.99,
        }
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--score-events", type=int, default=100_000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--keep", action="store_true", help="keep the sample and models")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_ae_"))
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_start": os.getloadavg(),
        },
        "versions": {"torch": torch.__version__, "onnxruntime": ort.__version__},
        "threads": args.threads,
    }

    signal = SignalSpec("jm", 2000.0, 100.0, n_events=500, extra={"photons": 1})
    start = time.perf_counter()
    info = generate_sample(
        work / "sample",
        SampleConfig(n_events=args.events, seed=args.seed, signals=(signal,)),
    )
    n_total = info.n_background + sum(info.n_signal)
    result["sample"] = {
        "events": n_total,
        "lumi_pb": info.lumi_pb,
        "generate_s": time.perf_counter() - start,
    }
    print(f"generated {n_total} events in {result['sample']['generate_s']:.1f} s")

    # training on 1 %: read + RMM of the picked events, then torch
    start = time.perf_counter()
    parts = []
    for chunk in iterate_events(info.files, "nanoaod"):
        picked = training_selection(chunk.keys(), 0.01, args.seed)
        subset: EventChunk = subset_chunk(chunk, picked)
        parts.append((rmm_features(rmm_matrices(subset)), subset.keys()))
    features = np.concatenate([f for f, _ in parts])
    events = np.concatenate([e for _, e in parts])
    collect_s = time.perf_counter() - start
    start = time.perf_counter()
    model = train_autoencoder(
        features,
        events,
        seed=args.seed,
        fraction=0.01,
        max_epochs=args.max_epochs,
        threads=args.threads,
    )
    train_s = time.perf_counter() - start
    if model.n_fit_events + model.n_validation_events != len(events):
        # the bench's pick must be the training's own (by event key), or it trains on 1 % of 1 %
        raise SystemExit(
            f"trained on {model.n_fit_events + model.n_validation_events} of the {len(events)} "
            "events picked: the bench and train_autoencoder pick different events"
        )
    epochs = len(model.loss.train)
    result["training"] = {
        "training_events": len(events),
        "fit_events": model.n_fit_events,
        "validation_events": model.n_validation_events,
        "collect_features_s": collect_s,
        "train_s": train_s,
        "epochs": epochs,
        "best_epoch": model.loss.best_epoch,
        "stopped_early": model.loss.stopped_early,
        "s_per_epoch": train_s / epochs,
        "fit_events_per_s": model.n_fit_events * epochs / train_s,
    }
    print(f"trained on {len(events)} events: {train_s:.1f} s, {epochs} epochs")

    fp32_path = work / "ae.onnx"
    export_onnx(model, fp32_path)
    int8_path = work / "ae_int8.onnx"
    quantize_int8(fp32_path, int8_path)
    linear_weights = [
        layer.weight.detach().numpy().T
        for layer in model.network.layers
        if isinstance(layer, torch.nn.Linear)
    ]
    raw_path = raw_matmul_chain(linear_weights, work / "raw.onnx")

    # scoring throughput on the same events, against the raw MatMul chain
    chunks = iterate_events(info.files, "nanoaod", max_events=args.score_events)
    sample_features = np.concatenate([rmm_features(rmm_matrices(c)) for c in chunks])
    n_score = len(sample_features)
    scoring: dict[str, Any] = {"events": n_score}
    for threads in sorted({1, args.threads, 2}):
        fp32 = load_scorer(fp32_path, threads=threads)
        int8 = load_scorer(int8_path, threads=threads)
        raw = session(raw_path, threads)

        def run_raw(raw: ort.InferenceSession = raw) -> None:
            for begin in range(0, n_score, 8192):
                raw.run(None, {"features": sample_features[begin : begin + 8192]})

        raw_rate = rate(run_raw, n_score)
        fp32_rate = rate(lambda fp32=fp32: fp32.score(sample_features), n_score)
        int8_rate = rate(lambda int8=int8: int8.score(sample_features), n_score)
        scoring[f"threads_{threads}"] = {
            "raw_matmul_events_per_s": raw_rate,
            "fp32_events_per_s": fp32_rate,
            "int8_events_per_s": int8_rate,
            "fp32_over_raw": fp32_rate / raw_rate,
            "int8_over_raw": int8_rate / raw_rate,
            "int8_over_fp32": int8_rate / fp32_rate,
        }
        print(f"threads {threads}: {scoring[f'threads_{threads}']}")
    result["scoring"] = scoring

    # end to end: read -> RMM -> score -> table, over the whole sample: as the event pass
    # does it (`Scorer.score_chunk`, RMM features made and scored a batch at a time), and
    # with read + RMM of the next chunk in a worker thread (prefetch); scoring alone
    # measured above, same threads
    scorer = load_scorer(fp32_path, threads=args.threads)
    scoring_alone = scoring[f"threads_{args.threads}"]["fp32_events_per_s"]
    for prefetch in (0, 2):
        cache: dict[int, np.ndarray] = {}

        def chunks_with_scores(prefetch: int = prefetch, cache: dict[int, Any] = cache) -> Any:
            chunks = iterate_events(info.files, "nanoaod")
            for chunk, scores in scored_chunks(chunks, scorer, prefetch=prefetch):
                cache[id(chunk)] = scores
                yield chunk

        def cached_scores(chunk: Any, cache: dict[int, Any] = cache) -> Any:
            return cache.pop(id(chunk))

        start = time.perf_counter()
        summary = write_event_table(
            iterate_events(info.files, "nanoaod") if prefetch == 0 else chunks_with_scores(),
            work / f"events_{prefetch}.parquet",
            score=scorer.score_chunk if prefetch == 0 else cached_scores,
            training=lambda keys: np.zeros(len(keys), dtype=bool),
        )
        seconds = time.perf_counter() - start
        e2e_rate = summary.n_events / seconds
        key = "end_to_end" if prefetch == 0 else f"end_to_end_prefetch_{prefetch}"
        result[key] = {
            "events": summary.n_events,
            "seconds": seconds,
            "events_per_s": e2e_rate,
            "scoring_alone_events_per_s": scoring_alone,
            "ratio_to_scoring_alone": e2e_rate / scoring_alone,
            "goal_ratio": 0.8,
        }
        print(f"{key}: {result[key]}")

    # int8 against fp32 on every event of the sample, ARs at the sample's luminosity
    fp32 = load_scorer(fp32_path, threads=args.threads)
    int8 = load_scorer(int8_path, threads=args.threads)
    fp32_parts, int8_parts, bits_parts = [], [], []
    for chunk, chunk_features in feature_chunks(iterate_events(info.files, "nanoaod")):
        fp32_parts.append(fp32.score(chunk_features))
        int8_parts.append(int8.score(chunk_features))
        bits_parts.append(stream_bits(chunk))
    fp32_scores, int8_scores = np.concatenate(fp32_parts), np.concatenate(int8_parts)
    agreement = score_agreement(fp32_scores, int8_scores, info.lumi_pb)
    result["int8_agreement"] = {
        "events": n_total,
        "lumi_pb": info.lumi_pb,
        "spearman_rho": agreement.spearman_rho,
        "overlap": {f"{o.xsec_pb:g} pb": o.fraction for o in agreement.overlaps},
        "selected": {f"{o.xsec_pb:g} pb": o.n_selected for o in agreement.overlaps},
        "per_stream_and_point": _overlap_per_point(
            fp32_scores, int8_scores, np.concatenate(bits_parts), info.lumi_pb
        ),
    }
    print(f"int8 agreement: {result['int8_agreement']}")
    result["machine"]["load_average_end"] = os.getloadavg()

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")
    if args.keep:
        print(f"sample and models kept in {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
