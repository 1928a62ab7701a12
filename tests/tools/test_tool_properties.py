"""Every registered tool, any JSON value in any field: exit 0 or 2, one line, bounded time.

For each tool a valid base input (over tiny real files) is changed in one field to an
arbitrary JSON value (nulls, booleans, huge and negative integers, NaN and infinities,
strings of any characters, nested lists and objects). The command-line path that a user
takes (`anomscan tool NAME --json ...`) must then end with status 0 or 2, print no
traceback, and return within `CALL_SECONDS`. Path fields are kept inside the test's
folder (a drawn absolute path is made relative): the tests run as root on a shared host.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.cli.main import main
from core.events import iterate_events
from core.synth import SampleConfig, SignalSpec, generate_sample
from core.table import write_event_table
from tools.registry import all_tools, get_tool

CALL_SECONDS = 30
EXAMPLES = 12


class _Hang(Exception):
    """A tool call took longer than CALL_SECONDS."""


@contextlib.contextmanager
def _time_limit(seconds: int) -> Iterator[None]:
    def stop(signum: int, frame: Any) -> None:
        raise _Hang(f"call took more than {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _run_folder(run: Path, scored: Path, model: Path) -> Path:
    """The files `signal_acceptance` reads of a finished scan: results, config, scored table."""
    from core.table import commit_table_parts

    (run / "events").mkdir(parents=True)
    (run / "events" / "part-000000-x.parquet").write_bytes(scored.read_bytes())
    commit_table_parts(run / "events", ["part-000000-x.parquet"], {"scored": True})
    (run / "events" / "pass.json").write_text(json.dumps({"model": str(model), "selection": {}}))
    (run / "results.json").write_text(json.dumps({"luminosity_pb": 100.0, "points_pb": [1.0]}))
    (run / "config.json").write_text(json.dumps({"run_dir": str(run)}))
    return run


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """A valid input for every tool, over a 600-event sample and small histograms."""
    folder = tmp_path_factory.mktemp("properties")
    info = generate_sample(
        folder / "sample",
        SampleConfig(n_events=600, seed=2, signals=(SignalSpec("jm", 1500.0, 30.0, n_events=40),)),
    )
    files = [str(p) for p in info.files]
    table = folder / "events.parquet"
    write_event_table(iterate_events(files), table)
    model = folder / "ae.onnx"
    get_tool("train_autoencoder").call(
        {"inputs": files, "output": str(model), "fraction": 0.2, "max_epochs": 1}
    )
    scored = folder / "scored.parquet"
    scored.write_bytes(table.read_bytes())
    get_tool("score_events").call({"inputs": files, "model": str(model), "table": str(scored)})
    run = _run_folder(folder / "run", scored, model)
    edges = np.geomspace(100.0, 3000.0, 31)
    centres = np.sqrt(edges[:-1] * edges[1:])
    background = 5e4 * (centres / 100.0) ** -3.0 * np.diff(edges) / 10.0
    counts = np.random.default_rng(1).poisson(background).astype(float)
    histogram = {"edges": edges.tolist(), "counts": counts.tolist()}
    with_background = histogram | {"background": background.tolist()}
    np.savez(folder / "h.npz", edges=edges, counts=counts, background=background)
    return {
        "read_events": {"inputs": files},
        "generate_sample": {"output_dir": "generated", "n_events": 50},
        "compute_rmm": {"inputs": files, "output": "rmm.npz", "max_events": 50},
        "event_table": {"inputs": files, "output": "table.parquet", "max_events": 200},
        "spectra": {"table": str(scored), "output": "spectra.npz", "score_min": 0.0},
        "train_autoencoder": {
            "inputs": files,
            "output": "model.onnx",
            "fraction": 0.05,
            "max_epochs": 1,
        },
        "score_events": {"inputs": files, "model": str(model), "table": "copy.parquet"},
        "anomaly_region": {"table": str(scored), "xsec_pb": 0.1, "lumi_pb": 100.0},
        "fit_background": {"histogram": histogram, "function": "p3"},
        "choose_background": {"histogram": histogram, "use_fallback": False},
        "robustness_checks": {"histogram": histogram, "function": "p3"},
        "symbolic_fit": {"histogram": histogram, "generations": 2, "population_size": 20},
        "bump_hunt": {"histogram": with_background, "n_toys": 50, "max_toys": 100},
        "search_spectrum": {
            "histogram": histogram,
            "fit_range": [100.0, 3000.0],
            "function": "p3",
            "n_toys": 50,
            "max_toys": 100,
        },
        "analyse_spectrum": {
            "histogram": histogram,
            "use_fallback": False,
            "n_toys": 50,
            "max_toys": 100,
        },
        "signal_fit": {"histogram": with_background, "mass": 1000.0},
        "scan_significance": {
            "spectra": [
                {
                    "name": "T1/jm",
                    "cross_sections_pb": [1.0],
                    "edges": edges.tolist(),
                    "counts": [counts.tolist()],
                    "background": [background.tolist()],
                }
            ],
            "n_pseudo_scans": 50,
            "max_pseudo_scans": 100,
        },
        "signal_acceptance": {"run_dir": str(run), "inputs": files},
        "set_limits": {
            "lumi_pb": 100.0,
            "spectra": [
                {
                    "spectrum": "T2/jm",
                    "point_pb": 1.0,
                    "edges": edges.tolist(),
                    "counts": counts.tolist(),
                    "background": background.tolist(),
                    "background_error": (0.05 * background).tolist(),
                }
            ],
            "widths": [0.0, 0.1],
            "n_masses": 4,
        },
        "_table": {"path": str(table)},
    }


def test_every_registered_tool_has_a_base_input(bases: dict[str, dict[str, Any]]) -> None:
    assert sorted(t.name for t in all_tools()) == sorted(k for k in bases if k != "_table")


_BIG = "__5000_digit_integer__"
"""Stands for an integer of 5000 digits (json.dumps itself refuses to write one)."""

_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63) - 1, 10**30, _BIG])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
)
_json_values = st.recursive(
    _scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _contained(value: Any) -> Any:
    """Keep drawn paths inside the working folder: no absolute paths, no '..'."""
    if value == _BIG:
        return value
    if isinstance(value, str):
        parts = [p for p in value.replace("\\", "/").split("/") if p not in ("", "..")]
        return "/".join(parts) or "x"
    if isinstance(value, list):
        return [_contained(v) for v in value]
    if isinstance(value, dict):
        return {k: _contained(v) for k, v in value.items()}
    return value


_PATH_FIELDS = {"inputs", "output", "output_dir", "table", "model", "mapping", "features"}
_PATH_FIELDS |= {"compare_with", "path", "points_path"}


_KNOWN_BUGS: dict[str, str] = {}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(t.name, marks=pytest.mark.xfail(strict=True, reason=_KNOWN_BUGS[t.name]))
        if t.name in _KNOWN_BUGS
        else t.name
        for t in all_tools()
    ],
)
def test_any_json_in_one_field_exits_0_or_2(
    name: str,
    bases: dict[str, dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tool = get_tool(name)
    fields = sorted({f.alias or key for key, f in tool.input_model.model_fields.items()})
    work = tmp_path_factory.mktemp(f"work_{name}")
    monkeypatch.chdir(work)
    monkeypatch.setenv("ANOMSCAN_LOG_DIR", str(work / "logs"))
    table = bases["_table"]["path"]

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(field=st.sampled_from([*fields, "not_a_field"]), value=_json_values)
    def check(field: str, value: Any) -> None:
        payload = dict(bases[name])
        if name == "score_events":
            Path("copy.parquet").write_bytes(Path(table).read_bytes())
        payload[field] = _contained(value) if field in _PATH_FIELDS else value
        text = json.dumps(payload).replace(f'"{_BIG}"', "9" * 5000)
        start = time.perf_counter()
        with _time_limit(CALL_SECONDS):
            status = main(["tool", name, "--json", text])
        seconds = time.perf_counter() - start
        captured = capsys.readouterr()
        assert status in (0, 2), f"{name}.{field}={value!r}: exit {status}: {captured.err}"
        assert "Traceback" not in captured.err
        assert seconds < CALL_SECONDS
        if status == 0:
            json.loads(captured.out, parse_constant=_no_constants)  # strict JSON out
        else:
            assert captured.err.count("\n") == 1, captured.err

    check()


def _no_constants(name: str) -> float:
    raise AssertionError(f"the output holds {name}, which is not JSON")


def test_the_readme_lists_exactly_the_registered_tools() -> None:
    """The README's tool list is the registry's: a new tool is documented, none is invented."""
    import re

    from tools.registry import all_tools

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    paragraph = readme.split("Tools today (`anomscan tool list`):", 1)[1].split("Every tool", 1)[0]
    listed = set(re.findall(r"`([a-z_]+)`", paragraph))
    assert listed == {tool.name for tool in all_tools()}
