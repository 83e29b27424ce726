"""`streamrec bench pipeline`: the stage profile's arithmetic, and a small two-worker sweep
as a user runs it (one consumer group, counters summed over the fleet)."""
from __future__ import annotations

import argparse
import json

import pytest

from stream_app.bench import pipeline


def test_stage_profile_charges_untimed_cpu_to_the_framework():
    before = dict.fromkeys(("decode", "state_read", "update", "rank", "state_write", "send",
                            "step", "rebuild", "score"), 0.0)
    after = {**before, "decode": 0.01, "rank": 0.05, "step": 0.02, "rebuild": 0.01, "score": 0.015, "send": 0.004}
    profile = pipeline.stage_profile(before, after, cpu_s=0.2, events=1000)
    assert profile["total"] == 200.0  # µs per event
    assert profile["decode"] == 10.0 and profile["rank"] == 50.0 and profile["send"] == 4.0
    assert profile["rank.inference"] == 30.0 and profile["rank.scoring"] == 15.0
    assert profile["framework"] == 200.0 - 10.0 - 50.0 - 4.0  # sub-stages of rank are not counted twice
    assert pipeline.stage_profile(before, after, cpu_s=0.2, events=0) == {}


@pytest.mark.integration
def test_two_workers_share_the_load_and_report_stages(tmp_path):
    args = argparse.Namespace(levels=[400], baseline_levels=[100], seconds=4.0, items=2_000, users=200, dim=16,
                              layers=1, window=10, history=50, workers=2, json=tmp_path / "p.json",
                              plot=tmp_path / "p.png")
    assert pipeline.run(args) == 0
    result = json.loads(args.json.read_text())
    engine = [r for r in result["levels"] if r["engine"] == "engine"]
    assert result["workers"] == 2 and engine[0]["workers"] == 2
    assert engine[0]["kept_up"] and engine[0]["processed_per_s"] > 300
    stages = engine[0]["cpu_us_per_event"]
    assert set(stages) == set(pipeline.STAGE_NAMES) and stages["rank"] > 0 and stages["total"] > stages["rank"]
    assert args.plot.stat().st_size > 0
