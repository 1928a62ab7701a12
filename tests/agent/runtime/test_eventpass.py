"""The parallel event pass: serial and Ray agree, resume from parts, failures are named."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agent.runtime.eventpass import EventPassError, PassSpec, event_pass, plan_chunks
from core.errors import InvalidInputError
from core.events import read_entry_range
from core.synth import SampleConfig, SignalSpec, generate_sample
from tests.agent.conftest import assert_same_rows, event_rows
from tests.rangeserver import RangeServer


@pytest.fixture(autouse=True)
def _no_ray_left_running():
    """Each test owns its Ray instance: a driver left connected dies with the next `ray stop`."""
    yield
    import ray

    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pass")
    return generate_sample(
        folder,
        SampleConfig(
            n_events=24_000,
            seed=9,
            events_per_file=12_500,
            signals=(SignalSpec("jm", 1500.0, 30.0, n_events=500),),
        ),
    )


def test_tasks_cover_every_entry_once(sample):
    tasks = plan_chunks(sample.files, 5_000, PassSpec())
    covered = {}
    for task in tasks:
        covered.setdefault(task.path, []).append((task.entry_start, task.entry_stop))
    assert [t.index for t in tasks] == list(range(len(tasks)))
    for ranges in covered.values():
        assert ranges[0][0] == 0
        assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))
    assert sum(t.entry_stop - t.entry_start for t in tasks) == 24_500


@pytest.mark.slow
def test_serial_and_ray_write_identical_tables(sample, tmp_path):
    serial = event_pass(sample.files, tmp_path / "serial", step_size=5_000)
    parallel = event_pass(
        sample.files, tmp_path / "ray", executor="ray", step_size=5_000, workers=2
    )
    assert serial.n_events == parallel.n_events == 24_500
    assert serial.stream_counts == parallel.stream_counts
    assert_same_rows(event_rows(tmp_path / "serial"), event_rows(tmp_path / "ray"))


def test_resume_reuses_written_parts(sample, tmp_path):
    first = event_pass(sample.files, tmp_path, step_size=5_000)
    before = event_rows(tmp_path)
    (part,) = tmp_path.glob("part-000002-*.parquet")
    part.unlink()
    again = event_pass(sample.files, tmp_path, step_size=5_000)
    assert again.n_reused == first.n_parts - 1
    assert_same_rows(event_rows(tmp_path), before)


def test_a_failing_chunk_is_named_and_the_rest_is_kept(sample, tmp_path):
    folder = Path(sample.files[0]).parent
    with RangeServer(folder) as server:
        url = server.url(Path(sample.files[0]).name)
        tasks = plan_chunks([url], 5_000, PassSpec())
        before = server.requests
        event_pass([url], tmp_path / "scratch", step_size=5_000)
        needed = server.requests - before
        server.fail_after = server.requests + needed // 2
        with pytest.raises(EventPassError, match=r"entries \d+\.\.\d+: InputFileError") as error:
            event_pass([url], tmp_path, step_size=5_000)
    written = list(tmp_path.glob("part-*.parquet"))
    assert 0 < len(written) < len(tasks)
    assert url in str(error.value)


def test_partitioned_table_reads_like_a_single_file(sample, tmp_path):
    from core.events import iterate_events
    from core.table import add_score_column, read_event_table, table_spectra, write_event_table

    event_pass(sample.files, tmp_path / "parts", step_size=5_000)
    write_event_table(iterate_events(sample.files, step_size=5_000), tmp_path / "single.parquet")
    parts = read_event_table(tmp_path / "parts")
    single = read_event_table(tmp_path / "single.parquet")
    np.testing.assert_array_equal(parts.event, single.event)
    np.testing.assert_array_equal(parts.masses, single.masses)
    np.testing.assert_array_equal(
        table_spectra(tmp_path / "parts").spectra.counts,
        table_spectra(tmp_path / "single.parquet").spectra.counts,
    )
    scores = np.arange(len(parts), dtype=float)
    add_score_column(tmp_path / "parts", scores, np.zeros(len(parts), dtype=bool))
    rescored = read_event_table(tmp_path / "parts")
    np.testing.assert_array_equal(rescored.score, scores)
    cut = table_spectra(tmp_path / "parts", score_min=float(len(parts) - 1001))
    assert cut.n_selected == 1000


def test_non_finite_values_are_counted_through_the_pass_and_its_resume(
    shared_data: Path, tmp_path: Path
) -> None:
    """A third of the muons' pt set to NaN: the pass reports every one and the muons it
    dropped, and a resumed pass (parts reused) reports the same counts."""
    from tests.nanofiles import nanoaod_with_nan_muons

    source = shared_data / "nanoAOD_2015_CMS_Open_Data_ttbar.root"
    path, n_nan = nanoaod_with_nan_muons(source, tmp_path / "nan.root")
    assert n_nan > 0
    first = event_pass([path], tmp_path / "table", step_size=5000)
    again = event_pass([path], tmp_path / "table", step_size=5000)
    assert again.n_reused == again.n_parts
    for summary in (first, again):
        assert summary.non_finite == {"Muon_pt": n_nan}
        assert summary.dropped_non_finite == {"muons": n_nan}


def test_a_worker_on_another_host_takes_its_own_copy_but_not_another_file(sample, tmp_path):
    """The driver's host checks size and mtime; another node (its own copy of the input,
    written later) checks the ROOT UUID and the entries: the copy is read, a file of another
    sample under the planned name is refused, naming the file."""
    from dataclasses import replace

    from agent.runtime.eventpass import compute_part
    from core.errors import InputFileError

    original = Path(sample.files[0])
    (task,) = plan_chunks([original], 20_000, PassSpec(), max_events=5_000)
    copy = tmp_path / "copy" / original.name
    copy.parent.mkdir()
    shutil.copy(original, copy)  # same bytes, a later modification time
    os.utime(copy, ns=(0, 0))
    elsewhere = replace(task, path=str(copy))
    with pytest.raises(InputFileError, match="not the file the pass planned"):
        compute_part(elsewhere, PassSpec())  # on the driver's host: the mtime differs
    read = compute_part(elsewhere, PassSpec(), driver_host="another-host")
    assert read.info["n_events"] == compute_part(task, PassSpec()).info["n_events"] == 5_000
    other = generate_sample(
        tmp_path / "other", SampleConfig(n_events=24_000, seed=10, events_per_file=12_500)
    )
    impostor = Path(other.files[0])
    with pytest.raises(InputFileError, match="is not the file") as error:
        compute_part(replace(task, path=str(impostor)), PassSpec(), driver_host="another-host")
    assert str(impostor) in str(error.value)
    # of the same size it is told by its ROOT UUID
    planned_uuid = dict(task.source)["uuid"]
    with pytest.raises(InputFileError, match="is not the file that was planned"):
        read_entry_range(impostor, 0, 5_000, file_uuid=planned_uuid)
    assert len(read_entry_range(copy, 0, 5_000, file_uuid=planned_uuid)) == 5_000


@pytest.mark.parametrize("executor", ["serial", "ray"])
def test_a_part_the_driver_cannot_write_stops_the_pass_with_its_name(sample, tmp_path, executor):
    """The driver alone writes the parts: one it cannot write (a folder sits where the
    file goes) stops the pass at once with one error naming it (exit 2 in the CLI), not a
    list of failed chunks once every chunk is computed; the parts written before it stay,
    with no scratch file."""
    event_pass(sample.files, tmp_path / "names", step_size=4_000)
    names = sorted(p.name for p in (tmp_path / "names").glob("part-*.parquet"))
    folder = tmp_path / "events"
    (folder / names[2]).mkdir(parents=True)
    with pytest.raises(InvalidInputError, match=f"event-table part to .*{names[2]}: it is a fo"):
        event_pass(sample.files, folder, step_size=4_000, executor=executor, workers=1)
    left = {p.name for p in folder.iterdir()} - {".anomscan.lock", "pass.json"}
    assert names[2] in left and left <= set(names), left
    if executor == "serial":
        assert set(names[:3]) == left


@pytest.mark.skipif(os.geteuid() != 0, reason="starting a worker node as another user needs root")
def test_a_cluster_worker_reads_a_flat_ntuple_with_the_drivers_mapping(shared_data, tmp_path):
    """A column mapping in a folder the worker node (running as `nobody`) cannot read travels
    with the job: the worker reads the flat ntuple by URL with it and the table equals the
    serial pass's. A rerun after a part is lost reuses the others (the URL plans alike).
    The clustered passes run in a driver process of their own, as a user's would (a driver
    that already ran a local Ray session in this process keeps that session's node)."""
    from tests.raycluster import RAY_ENV, unprivileged_worker_cluster

    mapping = tmp_path / "private" / "zmumu.toml"
    mapping.parent.mkdir(mode=0o700)
    mapping.write_text(
        'name = "mine"\ntree = "events"\n[ids]\nevent = "Event"\n'
        '[muons]\npt = ["pt1", "pt2"]\neta = ["eta1", "eta2"]\nphi = ["phi1", "phi2"]\n'
        "mass = 0.10566\n"
    )
    spec = PassSpec(schema="mapping", mapping=str(mapping))
    name = "uproot-Zmumu.root"
    serial = event_pass([shared_data / name], tmp_path / "serial", spec, step_size=1_000)
    with unprivileged_worker_cluster() as cluster, RangeServer(shared_data) as server:
        driver = _CLUSTER_DRIVER.format(url=server.url(name), mapping=mapping, out=tmp_path / "ray")
        done = subprocess.run(
            [sys.executable, "-c", driver],
            env={
                **os.environ,
                **RAY_ENV,
                "RAY_ADDRESS": cluster.address,
                "PYTHONPATH": str(Path(__file__).resolve().parents[3]),
            },
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
    assert done.returncode == 0, done.stderr[-3000:]
    first, clustered = (json.loads(line) for line in done.stdout.strip().splitlines()[-2:])
    assert first["n_parts"] == clustered["n_parts"] == 3 and first["n_reused"] == 0
    assert clustered["n_reused"] == 2
    assert clustered["n_events"] == serial.n_events == 2304
    # the muons come from the mapping: one or two of them put events in T2 and T3
    assert clustered["stream_counts"] == serial.stream_counts
    assert serial.stream_counts["T3"] > 1000 and serial.stream_counts["T2"] > 100
    assert_same_rows(event_rows(tmp_path / "ray"), event_rows(tmp_path / "serial"))


_CLUSTER_DRIVER = """
import json
from pathlib import Path
from agent.runtime.eventpass import PassSpec, event_pass

spec = PassSpec(schema="mapping", mapping="{mapping}")
out = Path("{out}")
first = event_pass(["{url}"], out, spec, executor="ray", step_size=1_000)
# a resume of the cluster-written table: the parts the driver wrote are reused
(part,) = out.glob("part-000001-*.parquet")
part.unlink()
again = event_pass(["{url}"], out, spec, executor="ray", step_size=1_000)
for summary in (first, again):
    print(json.dumps({{key: getattr(summary, key) for key in (
        "n_parts", "n_reused", "n_events", "stream_counts")}}))
"""


@pytest.mark.slow
def test_ray_retries_an_unreadable_input_but_not_an_error_that_would_repeat(tmp_path):
    """With the event pass's task options, a task failing on its input is tried 1 + 2 times;
    one failing on a schema, a model or a bug is tried once (each try appends to a file)."""
    from agent.runtime.eventpass import part_task_options
    from agent.runtime.executor import ray_session
    from core.errors import InputFileError, ModelError, SchemaError

    def failing(counter: str, error: type[Exception]) -> None:
        with Path(counter).open("a") as file:
            file.write(".")
        raise error("failed")

    tries = {}
    with ray_session(1) as ray:
        remote = ray.remote(**part_task_options(2))(failing)
        for error in (InputFileError, OSError, SchemaError, ModelError, KeyError):
            counter = tmp_path / error.__name__
            with pytest.raises(Exception, match="failed"):
                ray.get(remote.remote(str(counter), error))
            tries[error.__name__] = len(counter.read_text())
    assert tries == {
        "InputFileError": 3,
        "OSError": 3,
        "SchemaError": 1,
        "ModelError": 1,
        "KeyError": 1,
    }
