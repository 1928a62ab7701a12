"""Good-run lists (CMS JSON, ATLAS XML) and their use while reading events."""

from __future__ import annotations

import json

import numpy as np
import pytest

from core.errors import InvalidInputError, SchemaError
from core.events import count_certified, iterate_events, load_events
from core.goodruns import load_good_run_list
from core.synth import SampleConfig, generate_sample

ATLAS_XML = """<?xml version="1.0"?>
<LumiRangeCollection>
  <NamedLumiRange>
    <Name>PHYS_StandardGRL_All_Good</Name>
    <LumiBlockCollection><Run>1</Run>
      <LBRange Start="2" End="3"/><LBRange Start="5" End="5"/>
    </LumiBlockCollection>
    <LumiBlockCollection><Run>7</Run><LBRange Start="1" End="100"/></LumiBlockCollection>
  </NamedLumiRange>
</LumiRangeCollection>
"""


def test_cms_json_and_atlas_xml_agree(tmp_path):
    cms = tmp_path / "golden.json"
    cms.write_text(json.dumps({"1": [[5, 5], [2, 3]], "7": [[1, 100]]}))
    xml = tmp_path / "grl.xml"
    xml.write_text(ATLAS_XML)
    runs = np.array([1, 1, 1, 1, 1, 1, 7, 7, 8])
    blocks = np.array([1, 2, 3, 4, 5, 6, 100, 101, 1])
    expected = [False, True, True, False, True, False, True, False, False]
    assert load_good_run_list(cms).contains(runs, blocks).tolist() == expected
    assert load_good_run_list(xml).contains(runs, blocks).tolist() == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"1": [[5]]}', "expected \\[first, last\\]"),
        ('{"run1": [[1, 2]]}', "is not 'run'"),
        ('{"1": [[9, 2]]}', "not valid"),
        ("<LumiRangeCollection><oops></LumiRangeCollection>", "not valid XML"),
        ("<LumiRangeCollection></LumiRangeCollection>", "holds no LumiBlockCollection"),
        (
            "<a><LumiBlockCollection><LBRange Start='1' End='2'/></LumiBlockCollection></a>",
            "no <Run>",
        ),
    ],
)
def test_malformed_lists(tmp_path, text, message):
    path = tmp_path / "grl"
    path.write_text(text)
    with pytest.raises(InvalidInputError, match=message):
        load_good_run_list(path)


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    # luminosity blocks of 10k events: 25k events -> blocks 1, 2, 3
    return generate_sample(tmp_path_factory.mktemp("grl"), SampleConfig(n_events=25_000, seed=4))


def test_events_outside_the_list_are_dropped_and_counted(sample, tmp_path):
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"1": [[2, 2]]}))
    good_runs = load_good_run_list(golden)
    chunks = list(iterate_events(sample.files, step_size=7_000, good_runs=good_runs))
    kept = sum(len(c) for c in chunks)
    dropped = sum(c.n_outside_good_runs for c in chunks)
    assert kept == 10_000
    assert dropped == 15_000
    assert all(np.all(c.lumi_block == 2) for c in chunks if len(c))
    everything = load_events(sample.files)
    assert np.array_equal(
        np.concatenate([c.event for c in chunks]), everything.event[everything.lumi_block == 2]
    )
    assert count_certified(sample.files[0], good_runs) == (10_000, 25_000)


def test_good_runs_need_lumi_blocks(shared_data, tmp_path):
    golden = tmp_path / "golden.json"
    golden.write_text(json.dumps({"1": [[1, 1]]}))
    with pytest.raises(SchemaError, match="luminosity-block"):
        load_events(shared_data / "uproot-HZZ.root", good_runs=load_good_run_list(golden))
