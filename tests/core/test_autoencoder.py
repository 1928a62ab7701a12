"""Autoencoder: seeded training, ONNX export equal to torch, model cards, scoring, int8, errors."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import rankdata

from core import autoencoder
from core.autoencoder import (
    HIDDEN_SIZES,
    N_RMM_FEATURES,
    ModelCard,
    TrainedModel,
    card_path,
    events_sha256,
    export_onnx,
    load_scorer,
    quantize_int8,
    read_model_card,
    score_agreement,
    scored_chunks,
    train_autoencoder,
    training_selection,
)
from core.errors import InputFileError, InvalidInputError, ModelError
from core.events import iterate_events
from core.files import file_sha256
from core.objects import EventChunk
from core.rmm import BLINDED_CELLS, rmm_features, rmm_matrices
from core.synth import SampleConfig, SignalSpec, generate_sample, load_truth

PROJECT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _toy_features(n: int, width: int, seed: int) -> np.ndarray:
    """Correlated non-negative features on RMM-like scales (an AE can learn them)."""
    rng = np.random.default_rng(seed)
    latent = rng.gamma(2.0, 1.0, size=(n, 8))
    mixing = rng.uniform(0.0, 0.02, size=(8, width))
    noise = rng.normal(0.0, 0.002, size=(n, width))
    return np.abs(latent @ mixing + noise).astype(np.float32)


@dataclass(frozen=True)
class Exported:
    model: TrainedModel
    path: Path
    card: ModelCard
    features: np.ndarray
    event_ids: np.ndarray


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    """The real 1287-800-400-200-400-800-1287 network, trained briefly on 1500 toy events."""
    torch.set_num_threads(1)
    features = _toy_features(1500, N_RMM_FEATURES, seed=1)
    event_ids = np.arange(1000, 2500, dtype=np.int64)
    model = train_autoencoder(
        features, event_ids, seed=4, fraction=0.5, max_epochs=2, patience=2, threads=1
    )
    path = tmp_path_factory.mktemp("model") / "ae.onnx"
    card = export_onnx(model, path)
    return Exported(model, path, card, features, event_ids)


def test_training_selection_is_a_seeded_per_event_fraction() -> None:
    ids = np.arange(200_000, dtype=np.int64) * 7 + 3
    picked = training_selection(ids, 0.01, seed=42)
    # binomial(200000, 0.01): mean 2000, sigma 44.5; 5 sigma tolerance
    assert abs(int(picked.sum()) - 2000) < 5 * 44.5
    # per-event: the same in any order or chunking, and idempotent
    perm = np.random.default_rng(0).permutation(len(ids))
    assert np.array_equal(training_selection(ids[perm], 0.01, 42), picked[perm])
    halves = np.concatenate([training_selection(part, 0.01, 42) for part in np.split(ids, 2)])
    assert np.array_equal(halves, picked)
    assert training_selection(ids[picked], 0.01, 42).all()
    # another seed picks other events (overlap ~ 1 % of them)
    other = training_selection(ids, 0.01, seed=43)
    assert np.count_nonzero(other & picked) < 0.05 * picked.sum()
    assert training_selection(ids, 1.0, 0).all()


def test_events_sha256_depends_on_the_set_only() -> None:
    ids = np.array([5, 3, 9], dtype=np.int64)
    assert events_sha256(ids) == events_sha256(ids[::-1])
    assert events_sha256(ids) != events_sha256(np.array([5, 3, 8]))
    assert len(events_sha256(ids)) == 64


def test_onnx_agrees_with_torch_and_card_records_provenance(exported: Exported) -> None:
    scorer = load_scorer(exported.path, threads=1, batch_size=256)
    onnx_mse = scorer.mse(exported.features)
    torch_mse = exported.model.mse(exported.features)
    np.testing.assert_allclose(onnx_mse, torch_mse, rtol=1e-5, atol=0)
    np.testing.assert_allclose(scorer.score(exported.features), np.log(torch_mse), atol=1e-5)

    card = read_model_card(exported.path)
    assert card == exported.card
    assert card.input_size == N_RMM_FEATURES == 1287
    assert card.hidden_sizes == HIDDEN_SIZES
    assert card.blinded_cells == BLINDED_CELLS
    picked = exported.event_ids[training_selection(exported.event_ids, 0.5, 4)]
    assert card.n_training_events == len(picked) == card.n_fit_events + card.n_validation_events
    assert card.training_events_sha256 == events_sha256(picked)
    assert np.array_equal(exported.model.training_event_ids, np.sort(picked))
    assert (card.seed, card.fraction, card.opset) == (4, 0.5, 17)
    assert len(card.loss_train) == len(card.loss_validation) == 2
    assert card.onnx_sha256 == file_sha256(exported.path)
    assert {"torch", "onnx", "onnxruntime"} <= set(card.versions)
    assert card.versions["torch"].startswith("2.13")
    raw = json.loads(card_path(exported.path).read_text())
    assert raw["model_file"] == "ae.onnx"
    assert card_path(exported.path).name == "ae.card.json"


def test_standardisation_is_inside_the_graph(exported: Exported) -> None:
    # an event at the training mean reconstructs the standardised zero vector; scaling the
    # raw features must change the score, so ONNX takes raw features, not standardised ones
    scorer = load_scorer(exported.path)
    mean_event = exported.model.feature_mean.reshape(1, -1)
    shifted = mean_event + 50.0 * exported.model.feature_scale.reshape(1, -1)
    assert scorer.score(shifted)[0] > scorer.score(mean_event)[0] + 5.0


def test_batching_and_threads_do_not_change_scores(exported: Exported) -> None:
    one = load_scorer(exported.path, threads=1, batch_size=7).score(exported.features[:100])
    two = load_scorer(exported.path, threads=2, batch_size=4096).score(exported.features[:100])
    np.testing.assert_allclose(one, two, atol=1e-5)


def test_training_is_seeded_and_reproducible() -> None:
    features = _toy_features(600, 40, seed=2)
    ids = np.arange(600)
    kwargs = {"fraction": 1.0, "max_epochs": 3, "hidden_sizes": (24, 12, 24), "threads": 1}
    first = train_autoencoder(features, ids, seed=9, **kwargs)  # type: ignore[arg-type]
    again = train_autoencoder(features, ids, seed=9, **kwargs)  # type: ignore[arg-type]
    other = train_autoencoder(features, ids, seed=10, **kwargs)  # type: ignore[arg-type]
    assert first.loss == again.loss
    np.testing.assert_array_equal(first.score(features), again.score(features))
    assert first.loss.validation != other.loss.validation
    # the loss falls: the network learns the correlated features
    assert first.loss.train[-1] < first.loss.train[0]


def test_standardisation_moments_are_float64_over_blocks_of_the_fit_rows() -> None:
    # far from zero with a small spread, and more rows than one block: a float32 sum or a
    # block left out would miss the mean or the std
    rng = np.random.default_rng(4)
    n_rows = 3 * autoencoder._BLOCK_ROWS + 17
    values = (5e4 + rng.normal(0.0, [0.01, 3.0, 0.0], size=(n_rows, 3))).astype(np.float32)
    rows = rng.permutation(n_rows)[: n_rows - 500]
    mean, scale = autoencoder._feature_moments(values, rows, std_floor=1e-4)
    exact = values[rows].astype(np.float64)
    np.testing.assert_allclose(mean, exact.mean(axis=0), rtol=1e-14)
    np.testing.assert_allclose(scale[:2], exact.std(axis=0)[:2], rtol=1e-9)
    assert scale[2] == 1e-4  # a constant column is floored

    network = autoencoder._build_network(3, (2,), mean, scale)
    np.testing.assert_array_equal(
        autoencoder._standardised(network, values, rows).numpy(),
        network.standardise(torch.from_numpy(values[rows])).numpy(),
    )


def test_early_stopping_keeps_the_best_epoch() -> None:
    # 40 pure-noise events and a wide network: validation stops improving within a few epochs
    rng = np.random.default_rng(5)
    noise = rng.normal(0.0, 1.0, size=(40, 30)).astype(np.float32)
    model = train_autoencoder(
        noise,
        np.arange(40),
        seed=1,
        fraction=1.0,
        max_epochs=200,
        patience=3,
        learning_rate=3e-3,
        hidden_sizes=(256, 256, 256),
        threads=1,
    )
    curve = model.loss
    assert curve.stopped_early
    assert curve.best_epoch == int(np.argmin(curve.validation))
    assert len(curve.validation) == curve.best_epoch + 3 + 1
    # the returned weights are those of the best epoch, not the last: recompute the
    # validation loss on the seeded split (first 20 % of a permutation by the seed)
    assert model.n_validation_events == 8
    validation_rows = np.random.default_rng(1).permutation(40)[:8]
    recomputed = model.mse(noise[validation_rows]).mean()
    assert recomputed == pytest.approx(curve.validation[curve.best_epoch], rel=1e-5)
    assert recomputed < curve.validation[-1]


def test_int8_model_agrees_with_fp32(exported: Exported, tmp_path: Path) -> None:
    int8_path = tmp_path / "ae_int8.onnx"
    card = quantize_int8(exported.path, int8_path)
    assert card.quantization == "int8-dynamic"
    assert card.source_onnx_sha256 == exported.card.onnx_sha256
    assert card.training_events_sha256 == exported.card.training_events_sha256
    assert int8_path.stat().st_size < 0.4 * exported.path.stat().st_size
    test_features = _toy_features(2000, N_RMM_FEATURES, seed=3)
    fp32 = load_scorer(exported.path).score(test_features)
    int8 = load_scorer(int8_path).score(test_features)
    agreement = score_agreement(fp32, int8, lumi_pb=1000.0)
    assert agreement.spearman_rho > 0.95
    assert [o.n_selected for o in agreement.overlaps] == [100, 1000, 2000]
    assert agreement.overlaps[-1].fraction == 1.0  # 10 pb x 1000 pb^-1 selects everything
    assert agreement.overlaps[1].fraction > 0.8
    with pytest.raises(InvalidInputError, match="already quantised"):
        quantize_int8(int8_path, tmp_path / "twice.onnx")


def test_score_agreement_counts_the_common_events() -> None:
    reference = np.arange(1000, dtype=float)
    other = reference.copy()
    other[[999, 0]] = other[[0, 999]]  # the best event becomes the worst
    agreement = score_agreement(reference, other, lumi_pb=100.0, xsec_points_pb=(0.1, 1.0))
    assert [(o.n_selected, o.n_common) for o in agreement.overlaps] == [(10, 9), (100, 99)]
    assert agreement.overlaps[0].fraction == pytest.approx(0.9)
    assert 0.9 < agreement.spearman_rho < 1.0
    with pytest.raises(InvalidInputError, match="same length"):
        score_agreement(reference, other[:10], lumi_pb=1.0)
    with pytest.raises(InvalidInputError, match="constant"):
        score_agreement(reference, np.zeros(1000), lumi_pb=1.0)


def test_generator_signal_is_ranked_above_background(tmp_path: Path) -> None:
    """Background-only training; the injected X(2 TeV)->jm events with an extra photon and
    electron score higher than background: ROC AUC > 0.9 (seeded)."""
    background = generate_sample(tmp_path / "bkg", SampleConfig(n_events=3000, seed=11))
    signal = SignalSpec("jm", 2000.0, 100.0, n_events=200, extra={"photons": 1, "electrons": 1})
    mixed = generate_sample(
        tmp_path / "mix", SampleConfig(n_events=2000, seed=12, signals=(signal,))
    )

    def features_of(files: tuple[Path, ...]) -> tuple[np.ndarray, np.ndarray]:
        chunks = list(iterate_events(files, schema="nanoaod"))
        return (
            np.concatenate([rmm_features(rmm_matrices(chunk)) for chunk in chunks]),
            np.concatenate([chunk.event for chunk in chunks]),
        )

    train_features, train_ids = features_of(background.files)
    model = train_autoencoder(
        train_features, train_ids, seed=3, fraction=1.0, max_epochs=3, threads=1
    )
    path = tmp_path / "ae.onnx"
    export_onnx(model, path)
    test_features, test_ids = features_of(mixed.files)
    truth = load_truth(mixed.truth_path)["truth"]
    is_signal = np.isin(test_ids, truth[0]["events"])  # type: ignore[index]
    assert is_signal.sum() == 200
    scores = load_scorer(path).score(test_features)
    ranks = rankdata(scores)
    n_signal, n_background = int(is_signal.sum()), int((~is_signal).sum())
    auc = (ranks[is_signal].sum() - n_signal * (n_signal + 1) / 2) / (n_signal * n_background)
    assert auc > 0.9


def test_scoring_and_anomaly_regions_work_without_torch(exported: Exported, tmp_path: Path) -> None:
    features_path = tmp_path / "features.npy"
    np.save(features_path, exported.features[:300])
    expected = load_scorer(exported.path).score(exported.features[:300])
    np.save(tmp_path / "expected.npy", expected)
    script = textwrap.dedent(
        f"""
        import sys
        from importlib.abc import MetaPathFinder

        class HideTorch(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "torch" or name.startswith("torch."):
                    raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
                return None

        sys.meta_path.insert(0, HideTorch())  # import torch fails, as when not installed
        from pathlib import Path
        import numpy as np
        from core.anomaly import anomaly_region
        from core.autoencoder import load_scorer, train_autoencoder
        from core.errors import ModelError
        import core.events, core.rmm, core.table, tools.autoencoder  # the rest of the pipeline
        scorer = load_scorer(Path({str(exported.path)!r}))
        scores = scorer.score(np.load({str(features_path)!r}))
        assert np.allclose(scores, np.load({str(tmp_path / "expected.npy")!r}), atol=1e-6)
        region = anomaly_region(scores, 0.05, 1000.0)
        assert region.n_pass == 50, region
        try:
            train_autoencoder(np.zeros((10, 3)), np.arange(10))
        except ModelError as error:
            assert "train" in str(error)
        else:
            raise AssertionError("training without torch must raise ModelError")
        assert "torch" not in sys.modules
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-W", "error", "-c", script],
        cwd=PROJECT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_scored_chunks_keep_order_and_match_direct_scoring(
    exported: Exported, tmp_path: Path
) -> None:
    info = generate_sample(tmp_path / "sample", SampleConfig(n_events=700, seed=2))
    scorer = load_scorer(exported.path)
    chunks = list(iterate_events(info.files, "nanoaod", step_size=128))
    assert len(chunks) == 6
    for prefetch in (0, 2):
        results = list(scored_chunks(iter(chunks), scorer, prefetch=prefetch))
        assert [id(chunk) for chunk, _ in results] == [id(chunk) for chunk in chunks]
        for chunk, scores in results:
            direct = scorer.score(rmm_features(rmm_matrices(chunk)))
            np.testing.assert_array_equal(scores, direct)


def test_a_chunk_scored_a_batch_at_a_time_equals_its_features_scored(
    exported: Exported, tmp_path: Path
) -> None:
    """700 events in batches of 96 (the last one partial): the scores of `score_chunk`, whose
    features are made a batch at a time, equal those of the whole chunk's features."""
    info = generate_sample(tmp_path / "sample", SampleConfig(n_events=700, seed=2))
    (chunk,) = iterate_events(info.files, "nanoaod", step_size=1000)
    scorer = load_scorer(exported.path, batch_size=96)
    scores = scorer.score_chunk(chunk)
    np.testing.assert_array_equal(scores, scorer.score(rmm_features(rmm_matrices(chunk))))
    assert scores.shape == (700,) and np.unique(scores).size > 600


def test_scored_chunks_propagate_read_errors(exported: Exported) -> None:
    def failing() -> Iterator[EventChunk]:
        raise InputFileError("file x.root is truncated at entry 5")
        yield  # pragma: no cover

    scorer = load_scorer(exported.path)
    for prefetch in (0, 1):
        with pytest.raises(InputFileError, match="truncated"):
            list(scored_chunks(failing(), scorer, prefetch=prefetch))
    with pytest.raises(InvalidInputError, match="prefetch"):
        list(scored_chunks([], scorer, prefetch=-1))


def _copy_model(exported: Exported, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "ae.onnx"
    path.write_bytes(exported.path.read_bytes())
    card_path(path).write_text(card_path(exported.path).read_text())
    return path


def test_wrong_input_size_is_a_model_error(tmp_path: Path) -> None:
    small = train_autoencoder(
        _toy_features(200, 20, seed=6),
        np.arange(200),
        fraction=1.0,
        max_epochs=1,
        hidden_sizes=(8,),
        threads=1,
    )
    path = tmp_path / "small.onnx"
    assert export_onnx(small, path).blinded_cells == ()  # not RMM features
    with pytest.raises(ModelError, match="takes 20 features per event, expected 1287"):
        load_scorer(path)
    scorer = load_scorer(path, expected_input_size=20)
    with pytest.raises(InvalidInputError, match=r"shape \(events, 20\)"):
        scorer.score(np.zeros((3, 21), dtype=np.float32))


def test_corrupt_onnx_is_a_model_error(exported: Exported, tmp_path: Path) -> None:
    path = _copy_model(exported, tmp_path)
    path.write_bytes(b"this is not a protobuf" * 100)
    card = json.loads(card_path(path).read_text())
    card["onnx_sha256"] = file_sha256(path)  # the card agrees, the file is still garbage
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(ModelError, match="onnxruntime can not read model"):
        load_scorer(path)


def test_card_that_does_not_match_is_a_model_error(exported: Exported, tmp_path: Path) -> None:
    path = _copy_model(exported, tmp_path)
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF  # flip one byte of a weight
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its card"):
        load_scorer(path)


@pytest.mark.parametrize(
    ("card_text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"format": "something else"}', "not an anomscan model card"),
        ('{"format": "anomscan-model-card/1"}', "missing fields"),
    ],
)
def test_malformed_card_is_a_model_error(
    exported: Exported, tmp_path: Path, card_text: str, message: str
) -> None:
    path = _copy_model(exported, tmp_path)
    card_path(path).write_text(card_text)
    with pytest.raises(ModelError, match=message):
        load_scorer(path)


def test_missing_files_are_model_errors(exported: Exported, tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_scorer(tmp_path / "nothing.onnx")
    path = _copy_model(exported, tmp_path)
    card_path(path).unlink()
    with pytest.raises(ModelError, match="no model card"):
        load_scorer(path)
    with pytest.raises(InvalidInputError, match="threads and batch_size"):
        load_scorer(exported.path, threads=0)


def test_bad_features_are_rejected(exported: Exported) -> None:
    scorer = load_scorer(exported.path)
    bad = exported.features[:5].copy()
    bad[2, 7] = np.nan
    with pytest.raises(InvalidInputError, match="non-finite features"):
        scorer.score(bad)
    with pytest.raises(InvalidInputError, match="shape"):
        scorer.score(exported.features[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"event_ids": np.arange(5)}, "one id per event"),
        ({"event_ids": np.linspace(0, 1, 100)}, "integer array"),
        ({"fraction": 0.0}, r"fraction must be in \(0, 1\]"),
        ({"fraction": 0.001}, "at least 2 are needed"),
        ({"validation_fraction": 1.0}, "validation_fraction"),
        ({"max_epochs": 0}, "max_epochs must be >= 1"),
        ({"learning_rate": -1.0}, "must be positive"),
    ],
)
def test_training_input_errors(kwargs: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {
        "features": np.zeros((100, 4), dtype=np.float32),
        "event_ids": np.arange(100),
        "fraction": 1.0,
    }
    arguments.update(kwargs)
    features = arguments.pop("features")
    event_ids = arguments.pop("event_ids")
    with pytest.raises(InvalidInputError, match=message):
        train_autoencoder(features, event_ids, **arguments)  # type: ignore[arg-type]


def test_diverging_training_is_a_model_error() -> None:
    features = _toy_features(200, 10, seed=8)
    with pytest.raises(ModelError, match="training diverged"):
        train_autoencoder(
            features,
            np.arange(200),
            fraction=1.0,
            max_epochs=3,
            learning_rate=1e30,
            hidden_sizes=(8,),
            threads=1,
        )


def test_the_card_warns_of_few_training_events_and_of_overfitting(exported: Exported) -> None:
    from dataclasses import replace

    from core.autoencoder import MIN_TRAINING_EVENTS, training_warnings

    card = exported.card  # 750 training events
    assert card.n_training_events < MIN_TRAINING_EVENTS
    (few,) = (w for w in training_warnings(card) if "learned from" in w)
    assert f"learned from {card.n_training_events} events" in few
    fine = replace(
        card, n_training_events=10_000, loss_train=(1.0, 0.5), loss_validation=(1.1, 0.6),
        best_epoch=1,
    )  # fmt: skip
    assert training_warnings(fine) == ()
    overfit = replace(fine, loss_validation=(1.1, 50.0))
    (warning,) = training_warnings(overfit)
    assert "validation loss (50) is 100 times the training loss (0.5)" in warning
