"""The full event pass (read -> select -> RMM -> masses -> score -> table) serial vs Ray.

Two measurements, each against its baseline in the same run:
1. events/s of the whole pass on >= 2M synthetic events with 1 and 2 Ray workers
   (goal: >= 1.8x with 2 workers) and the peak memory of a worker (bounded by the chunk);
2. the Ray path against the serial path on a 10k-event dataset (small jobs must not be
   slower than serial by more than Ray's start-up).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

from agent.runtime.eventpass import PassSpec, event_pass
from core.autoencoder import export_onnx, train_autoencoder
from core.events import iterate_events
from core.rmm import rmm_features, rmm_matrices
from core.synth import SampleConfig, generate_sample

RESULTS = Path(__file__).with_name("results") / "eventpass.json"
N_EVENTS = int(os.environ.get("BENCH_EVENTS", "2000000"))
STEP = 100_000


def _model(files: list[str], folder: Path) -> str:
    chunk = next(iterate_events(files, step_size=20_000))
    features = rmm_features(rmm_matrices(chunk))
    model = train_autoencoder(features, chunk.event, fraction=1.0, max_epochs=2, threads=1)
    path = folder / "model.onnx"
    export_onnx(model, path)
    return str(path)


PEAK_RSS_MB: dict[str, float] = {}


def _timed_pass(files: list[str], out: Path, spec: PassSpec, **options: object) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    summary = event_pass(files, out, spec, step_size=STEP, **options)  # type: ignore[arg-type]
    elapsed = time.perf_counter() - start
    assert summary.n_reused == 0
    PEAK_RSS_MB[out.name] = round(summary.peak_rss_mb)
    return elapsed


def _start_ray(workers: int) -> float:
    """Start a local Ray instance with `workers` CPUs; return the start-up time (s)."""
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
    ray.get(ray.remote(lambda: 1).remote())
    return time.perf_counter() - start


def main() -> None:
    import ray

    folder = Path(tempfile.mkdtemp(prefix="bench_eventpass_"))
    try:
        sample = generate_sample(
            folder / "data", SampleConfig(n_events=N_EVENTS, seed=1, events_per_file=500_000)
        )
        files = [str(p) for p in sample.files]
        spec = PassSpec(model=_model(files, folder))
        serial = _timed_pass(files, folder / "serial", spec)
        with_workers, start_up = {}, {}
        for workers in (1, 2):
            start_up[workers] = _start_ray(workers)
            with_workers[workers] = _timed_pass(
                files, folder / f"ray{workers}", spec, executor="ray", workers=workers
            )
            ray.shutdown()
        small = generate_sample(folder / "small", SampleConfig(n_events=10_000, seed=2))
        small_files = [str(p) for p in small.files]
        small_serial = _timed_pass(small_files, folder / "small_serial", spec)
        small_auto = _timed_pass(small_files, folder / "small_auto", spec, executor="auto")
        small_start = _start_ray(2)
        small_ray = _timed_pass(small_files, folder / "small_ray", spec, executor="ray")
        ray.shutdown()
        result = {
            "n_events": N_EVENTS,
            "chunk_events": STEP,
            "serial_events_per_s": round(N_EVENTS / serial),
            "ray_1_worker_events_per_s": round(N_EVENTS / with_workers[1]),
            "ray_2_workers_events_per_s": round(N_EVENTS / with_workers[2]),
            "speedup_2_workers_vs_1": round(with_workers[1] / with_workers[2], 2),
            "speedup_2_workers_vs_serial": round(serial / with_workers[2], 2),
            "ray_start_s": {str(w): round(s, 2) for w, s in start_up.items()},
            "small_10k_serial_s": round(small_serial, 2),
            "small_10k_ray_start_s": round(small_start, 2),
            "small_10k_ray_pass_s": round(small_ray, 2),
            "small_10k_ray_overhead_beyond_start_s": round(small_ray - small_serial, 2),
            "small_10k_auto_s": round(small_auto, 2),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "worker_peak_rss_mb": PEAK_RSS_MB,
            "load_average": os.getloadavg(),
            "python": sys.version.split()[0],
        }
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
