"""Dataset manifests: resolution of files and globs, luminosity, schema checks, good runs."""

from __future__ import annotations

import json
import shutil

import pytest

from core.datasets import load_manifest, validate_dataset
from core.errors import InvalidInputError, SchemaError
from core.synth import SampleConfig, generate_sample


@pytest.fixture(scope="module")
def folder(tmp_path_factory, shared_data):
    root = tmp_path_factory.mktemp("manifest")
    generate_sample(root / "synth", SampleConfig(n_events=12_000, seed=2, events_per_file=6_000))
    shutil.copy(shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root", root / "nano.root")
    (root / "golden.json").write_text(json.dumps({"1": [[1, 1]]}))
    (root / "nowhere.json").write_text(json.dumps({"999": [[1, 1]]}))
    return root


def _manifest(folder, body):
    path = folder / "manifest.toml"
    path.write_text(body)
    return path


def test_manifest_resolves_globs_and_validates(folder):
    path = _manifest(
        folder,
        '[datasets.synth]\nfiles = ["synth/*.root"]\nschema = "nanoaod"\nlumi_pb = 1000.0\n'
        'kind = "simulation"\ngood_runs = "golden.json"\n'
        '[datasets.cms]\nfiles = ["nano.root"]\nlumi_pb = 2.5\n',
    )
    datasets = load_manifest(path)
    assert sorted(datasets) == ["cms", "synth"]
    synth = datasets["synth"]
    assert len(synth.files) == 2
    assert synth.lumi_pb == 1000.0
    reports = validate_dataset(synth)
    assert [r.entries for r in reports] == [6_000, 6_000]
    # luminosity blocks hold 10k events: block 1 is all of file 0 and the first 4k of file 1
    assert [r.in_good_runs for r in reports] == [6_000, 4_000]
    assert all(r.size_bytes and r.size_bytes > 0 for r in reports)
    assert validate_dataset(datasets["cms"])[0].schema == "nanoaod"


@pytest.mark.parametrize(
    ("body", "error", "message"),
    [
        (
            '[datasets.a]\nfiles = ["missing.root"]\nlumi_pb = 1.0\n',
            InvalidInputError,
            "does not exist",
        ),
        (
            '[datasets.a]\nfiles = ["none_*.root"]\nlumi_pb = 1.0\n',
            InvalidInputError,
            "matches no file",
        ),
        ('[datasets.a]\nfiles = ["nano.root"]\n', InvalidInputError, "has no lumi_pb"),
        ('[datasets.a]\nfiles = ["nano.root"]\nlumi_pb = 0\n', InvalidInputError, "must be > 0"),
        (
            '[datasets.a]\nfiles = ["nano.root"]\nlumi_pb = 1\nschema = "cms"\n',
            SchemaError,
            "unknown schema",
        ),
        (
            '[datasets.a]\nfiles = ["nano.root"]\nlumi_pb = 1\ncolour = 1\n',
            InvalidInputError,
            "unknown keys",
        ),
        (
            '[datasets.a]\nfiles = ["nano.root"]\nlumi_pb = 1\ngood_runs = "bad.json"\n',
            InvalidInputError,
            "does not exist",
        ),
        ("title = 1\n", InvalidInputError, "no \\[datasets.NAME\\]"),
        ("[datasets\n", InvalidInputError, "not valid TOML"),
    ],
)
def test_bad_manifests(folder, body, error, message):
    with pytest.raises(error, match=message):
        load_manifest(_manifest(folder, body))


def test_declared_schema_must_match_the_file(folder):
    path = _manifest(
        folder, '[datasets.a]\nfiles = ["nano.root"]\nlumi_pb = 1\nschema = "physlite"\n'
    )
    with pytest.raises(SchemaError):
        validate_dataset(load_manifest(path)["a"])


def test_good_run_list_that_excludes_everything(folder):
    path = _manifest(
        folder,
        '[datasets.a]\nfiles = ["synth/*.root"]\nlumi_pb = 1\ngood_runs = "nowhere.json"\n',
    )
    with pytest.raises(InvalidInputError, match="excludes every one of the 12000 events"):
        validate_dataset(load_manifest(path)["a"])


@pytest.mark.parametrize(
    ("value", "message"),
    [("nan", "finite"), ("inf", "finite"), ("true", "finite"), ("1e12", "above")],
)
def test_non_finite_or_huge_luminosity_is_refused(folder, value, message):
    manifest = folder / "lumi.toml"
    manifest.write_text(f'[datasets.d]\nfiles = ["*.root"]\nlumi_pb = {value}\n')
    with pytest.raises(InvalidInputError, match=message):
        load_manifest(manifest)


def test_non_utf8_manifest_and_good_run_lists_are_input_errors(folder):
    manifest = folder / "bytes.toml"
    manifest.write_bytes(b'[datasets.d]\nfiles = ["\xff"]\n')
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        load_manifest(manifest)
    from core.goodruns import load_good_run_list

    grl = folder / "grl.json"
    grl.write_bytes(b'{"1": [[1, 2]], "\xfe": 1}')
    with pytest.raises(InvalidInputError, match="not UTF-8"):
        load_good_run_list(grl)
    grl.write_text('{"' + "9" * 5000 + '": [[1, 2]]}')
    with pytest.raises(InvalidInputError, match="can not be read"):
        load_good_run_list(grl)
    grl.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(InvalidInputError):
        load_good_run_list(grl)
