"""`streamrec bench pipeline`: the stage profile's arithmetic, and a small two-worker sweep
as a user runs it (one consumer group, counters summed over the fleet)."""
from __future__ import annotations

import argparse
import json

import pytest

from stream_app.bench import pipeline


def test_stage_profile_charges_untimed_cpu_to_the_framework():
    before = dict.fromkeys(("decode", "state_read", "update", "rank", "state_write", "send",
                            "step", "rebuild", "score", "rules", "reasons"), 0.0)
    after = {**before, "decode": 0.01, "rank": 0.05, "step": 0.02, "rebuild": 0.01, "score": 0.015, "send": 0.004,
             "rules": 0.002, "reasons": 0.001}
    profile = pipeline.stage_profile(before, after, cpu_s=0.2, events=1000)
    assert profile["total"] == 200.0  # µs per event
    assert profile["decode"] == 10.0 and profile["rank"] == 50.0 and profile["send"] == 4.0
    assert profile["rank.inference"] == 30.0 and profile["rank.scoring"] == 15.0
    assert profile["rank.rules"] == 2.0 and profile["rank.reasons"] == 1.0
    assert profile["framework"] == 200.0 - 10.0 - 50.0 - 4.0  # sub-stages of rank are not counted twice
    assert pipeline.stage_profile(before, after, cpu_s=0.2, events=0) == {}


@pytest.mark.integration
def test_two_workers_drain_a_backlog_and_sweep_exact_and_ann_side_by_side(tmp_path):
    args = argparse.Namespace(levels=[400], baseline_levels=[100], seconds=3.0, items=2_000, users=200, dim=16,
                              layers=1, window=10, history=50, workers=2, backlog=1500, fractions=[0.05],
                              retrieval=["exact", "ann"], json=tmp_path / "p.json", plot=tmp_path / "p.png",
                              surfaces_file=tmp_path / "surfaces.toml", plain=True)
    args.surfaces_file.write_text('[surfaces.for_you]\nkind = "user"\nrules = { max_per_category = 2 }\n')
    assert pipeline.run(args) == 0
    result = json.loads(args.json.read_text())
    assert set(result["engines"]) == {"engine-exact", "engine-ann", "plain", "naive"}
    assert set(result["vs_plain"]) == {"drained_peak_per_s", "max_events_per_s"}
    for name in ("engine-exact", "engine-ann"):
        mine = [r for r in result["levels"] if r["engine"] == name]
        drain, swept = mine[0], mine[1:]
        assert drain["offered"] == "backlog" and drain["kept_up"] and drain["processed_per_s"] > 0
        assert set(drain["cpu_us_per_event"]) == set(pipeline.STAGE_NAMES)
        assert [r["offered"] for r in swept] == sorted({400, round(0.05 * drain["processed_per_s"], -1)})
        assert all(r["workers"] == 2 for r in mine)
        at_400 = next(r for r in swept if r["offered"] == 400)
        assert at_400["kept_up"] and at_400["processed_per_s"] > 300
        stages = at_400["cpu_us_per_event"]
        assert stages["rank"] > 0 and stages["total"] > 0  # stages are loop wall time: under load, > CPU
        assert stages["rank.rules"] > 0 and stages["rank.reasons"] > 0
        assert result["engines"][name]["drained_peak_per_s"] == drain["processed_per_s"]
    assert args.plot.stat().st_size > 0


def test_engines_per_retrieval_mode_and_against_another_checkout(tmp_path):
    args = argparse.Namespace(levels=[1000], baseline_levels=[100], retrieval=["exact", "ann"], against=tmp_path,
                              plain=False, surfaces_file=None)
    plan = pipeline.engines(args)
    assert [name for name, *_ in plan] == ["engine-exact", "engine-ann", "against", "naive"]
    assert plan[2][3] == {"PYTHONPATH": str(tmp_path.resolve())} and plan[0][3] is None
    assert plan[-1][2] == {"batch_max": 1, "incremental": False, "retrieval": "exact"}
    args.retrieval, args.against = ["auto"], None
    assert [name for name, *_ in pipeline.engines(args)] == ["engine", "naive"]
    args.plain, args.surfaces_file = True, tmp_path / "s.toml"
    plan = pipeline.engines(args)
    assert [name for name, *_ in plan] == ["engine", "plain", "naive"]
    assert plan[0][2]["surfaces_file"] == args.surfaces_file and plan[1][2]["reasons"] is False
    assert "surfaces_file" not in plan[1][2]
