"""Tools train_autoencoder, score_events, anomaly_region: JSON in, JSON out, files by path."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from core.autoencoder import events_sha256, read_model_card, training_selection
from core.errors import ToolError
from core.events import iterate_events
from core.rmm import rmm_features, rmm_matrices
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import STREAMS, read_event_table, write_event_table
from tools.registry import get_tool

LUMI_PB = 1000.0


@dataclass(frozen=True)
class Pipeline:
    files: list[str]
    table: Path
    model: Path
    trained: dict[str, object]
    folder: Path


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    """A small synthetic sample, its event table and a model trained by the tool on 50 %."""
    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("ae_tools")
    signal = SignalSpec("jm", 2000.0, 100.0, n_events=60, extra={"photons": 1})
    info = generate_sample(
        folder / "sample", SampleConfig(n_events=1200, seed=21, signals=(signal,))
    )
    files = [str(p) for p in info.files]
    table = folder / "events.parquet"
    write_event_table(iterate_events(files, "nanoaod"), table)
    trained = get_tool("train_autoencoder").call(
        {
            "inputs": files,
            "schema": "nanoaod",
            "output": str(folder / "model" / "ae.onnx"),
            "seed": 5,
            "fraction": 0.5,
            "max_epochs": 2,
            "threads": 1,
            "quantize_int8": True,
        }
    )
    return Pipeline(files, table, folder / "model" / "ae.onnx", trained, folder)


def test_train_tool_writes_model_card_and_int8(pipeline: Pipeline) -> None:
    out = pipeline.trained
    assert Path(str(out["model"])).is_file()
    assert Path(str(out["card"])).name == "ae.card.json"
    assert out["int8_model"] is not None
    assert Path(str(out["int8_model"])).is_file()
    events = read_event_table(pipeline.table).keys()
    picked = events[training_selection(events, 0.5, 5)]
    assert out["n_training_events"] == out["n_events_seen"] == len(picked)
    assert out["training_events_sha256"] == events_sha256(picked)
    assert len(out["loss_train"]) == 2  # type: ignore[arg-type]
    assert read_model_card(pipeline.model).seed == 5


def test_npz_features_train_the_same_model(pipeline: Pipeline) -> None:
    chunks = list(iterate_events(pipeline.files, "nanoaod"))
    npz = pipeline.folder / "features.npz"
    np.savez(
        npz,
        features=np.concatenate([rmm_features(rmm_matrices(c)) for c in chunks]),
        key=np.concatenate([c.keys() for c in chunks]),
    )
    out = get_tool("train_autoencoder").call(
        {
            "features": [str(npz)],
            "output": str(pipeline.folder / "npz" / "ae.onnx"),
            "seed": 5,
            "fraction": 0.5,
            "max_epochs": 2,
            "threads": 1,
        }
    )
    # same events, same features, same seed: the same training, bit for bit
    assert out["training_events_sha256"] == pipeline.trained["training_events_sha256"]
    assert out["loss_train"] == pipeline.trained["loss_train"]
    assert out["int8_model"] is None


def test_score_then_anomaly_region(pipeline: Pipeline, tmp_path: Path) -> None:
    table = tmp_path / "events.parquet"
    table.write_bytes(pipeline.table.read_bytes())
    scored = get_tool("score_events").call(
        {
            "inputs": pipeline.files,
            "schema": "nanoaod",
            "model": str(pipeline.model),
            "table": str(table),
            "compare_with": str(pipeline.trained["int8_model"]),
            "prefetch": 1,
            "lumi_pb": LUMI_PB,
        }
    )
    events = read_event_table(table)
    assert events.score is not None
    assert scored["n_scored"] == len(events) == 1260
    assert scored["training_events_match_card"] is True
    assert scored["n_training_events"] == pipeline.trained["n_training_events"]
    assert scored["score_max"] == pytest.approx(events.score.max())
    agreement = scored["agreement"]
    assert isinstance(agreement, dict)
    assert agreement["spearman_rho"] > 0.9
    assert set(agreement["overlap"]) == {"0.1", "1", "10"}

    training = training_selection(events.keys(), 0.5, 5)
    np.testing.assert_array_equal(events.training, training)
    tool = get_tool("anomaly_region")
    region = tool.call(
        {
            "table": str(table),
            "xsec_pb": 0.05,
            "lumi_pb": LUMI_PB,
            "stream": "all",
            "model": str(pipeline.model),
        }
    )
    # the scan's N: sigma x (1 - f) L, f the fraction of the table's events trained on
    lumi_search = LUMI_PB * (1 - training.mean())
    assert region["lumi_search_pb"] == pytest.approx(lumi_search)
    assert region["n_pass"] == region["n_requested"] == round(0.05 * lumi_search) < 50
    assert region["n_training_excluded"] == int(training.sum())
    assert region["n_stream"] == len(events) - int(training.sum())
    assert not region["whole_stream"]
    passing = (events.score > region["cut"]) & ~training
    assert int(passing.sum()) == region["n_pass"] - region["n_pass_at_cut"]

    stream = STREAMS.index("T2")
    in_t2 = events.stream_bits[:, stream] & ~training
    whole = tool.call(
        {
            "table": str(table),
            "xsec_pb": 100.0,
            "lumi_pb": LUMI_PB,
            "stream": "T2",
            "model": str(pipeline.model),
        }
    )
    assert whole["whole_stream"] is True
    assert whole["cut"] is None
    assert whole["n_pass"] == whole["n_stream"] == int(in_t2.sum())
    assert whole["effective_xsec_pb"] == pytest.approx(in_t2.sum() / lumi_search)

    with_training = tool.call(
        {"table": str(table), "xsec_pb": 0.05, "lumi_pb": LUMI_PB, "include_training": True}
    )
    assert with_training["n_stream"] == len(events)
    assert with_training["n_training_excluded"] == 0
    assert with_training["n_pass"] == 50 and with_training["lumi_search_pb"] == LUMI_PB
    # the table records its training events, so the model is only a cross-check
    without_model = tool.call({"table": str(table), "xsec_pb": 0.05, "lumi_pb": LUMI_PB})
    assert without_model == region


def test_anomaly_region_needs_scores(pipeline: Pipeline) -> None:
    with pytest.raises(ToolError, match="no score column"):
        get_tool("anomaly_region").call(
            {"table": str(pipeline.table), "xsec_pb": 1.0, "lumi_pb": 1.0, "include_training": True}
        )


def test_feature_file_errors(pipeline: Pipeline, tmp_path: Path) -> None:
    score = get_tool("score_events")
    base = {"model": str(pipeline.model), "table": str(pipeline.table)}
    with pytest.raises(ToolError, match="does not exist"):
        score.call(base | {"features": [str(tmp_path / "missing.npz")]})
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, rmm=np.zeros((2, 36, 36)))
    with pytest.raises(ToolError, match=r"lacks arrays \['features', 'key'\]"):
        score.call(base | {"features": [str(wrong)]})
    partial = tmp_path / "partial.npz"
    np.savez(partial, features=np.zeros((3, 1287), dtype=np.float32), key=np.arange(3))
    with pytest.raises(ToolError, match="events have no features"):
        score.call(base | {"features": [str(partial)]})
    narrow = tmp_path / "narrow.npz"
    np.savez(narrow, features=np.zeros((50, 12), dtype=np.float32), key=np.arange(50))
    with pytest.raises(ToolError, match=r"expected \(events, 1287\)"):
        get_tool("train_autoencoder").call(
            {"features": [str(narrow)], "output": str(tmp_path / "m.onnx"), "fraction": 1.0}
        )
    duplicated = tmp_path / "duplicated.npz"
    np.savez(duplicated, features=np.zeros((2, 1287), dtype=np.float32), key=np.array([4, 4]))
    with pytest.raises(ToolError, match="repeat an event"):
        score.call(base | {"features": [str(duplicated)]})


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        ({"output": "m.onnx"}, "give either 'features'"),
        ({"output": "m.onnx", "features": ["a.npz"], "inputs": ["b.root"]}, "give either"),
        ({"output": "m.onnx", "features": []}, "empty"),
        ({"output": "m.onnx", "features": ["a.npz"], "fraction": 0.0}, "greater than 0"),
        ({"output": "m.onnx", "features": ["a.npz"], "extra": 1}, "Extra inputs"),
    ],
)
def test_train_input_validation(payload: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        get_tool("train_autoencoder").call(payload)


def test_compare_needs_luminosity(pipeline: Pipeline) -> None:
    with pytest.raises(ValidationError, match="needs 'lumi_pb'"):
        get_tool("score_events").call(
            {
                "features": ["a.npz"],
                "model": str(pipeline.model),
                "table": str(pipeline.table),
                "compare_with": str(pipeline.model),
            }
        )
