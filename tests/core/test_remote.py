"""Remote reading over HTTP through the same code path as local files."""

from __future__ import annotations

import awkward as ak
import numpy as np
import pytest

from core.errors import InputFileError
from core.events import iterate_events, load_events
from core.synth import SampleConfig, generate_sample
from tests.rangeserver import RangeServer


def test_http_file_reads_like_the_local_file(shared_data):
    name = "nanoAOD_2015_CMS_Open_Data_ttbar.root"
    local = load_events(shared_data / name)
    with RangeServer(shared_data) as server:
        remote = load_events(server.url(name))
    assert remote.event.tolist() == local.event.tolist()
    for collection in ("jets", "bjets", "muons", "electrons", "photons"):
        assert ak.to_list(remote.collection(collection).pt) == ak.to_list(
            local.collection(collection).pt
        )
    np.testing.assert_array_equal(remote.met_pt, local.met_pt)


def test_missing_remote_file_is_a_clear_error(shared_data):
    with RangeServer(shared_data) as server, pytest.raises(InputFileError, match=r"nope\.root"):
        load_events(server.url("nope.root"))


def test_server_going_away_names_file_and_entry_range(tmp_path):
    info = generate_sample(tmp_path, SampleConfig(n_events=60_000, seed=1))
    with RangeServer(tmp_path) as server:
        url = server.url(info.files[0].name)
        chunks = iterate_events(url, step_size=20_000)
        first = next(chunks)
        assert len(first) == 20_000
        server.fail_after = server.requests  # every later request fails
        with pytest.raises(InputFileError, match=r"entries 20000\.\.40000 of http://127\.0\.0\.1"):
            next(chunks)
