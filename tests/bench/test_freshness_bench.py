"""`streamrec bench freshness`, small: broker, worker and learner live; the learner
publishes during the drifting stream, the worker serves it (variant A), and the JSON has
every key the issue's targets are judged on. Quality is not asserted at this size."""
from __future__ import annotations

import json

import pytest

from stream_app import cli
from stream_app.bench import freshness

pytestmark = pytest.mark.integration


def test_join_scores_each_event_against_the_list_shown_before_it():
    stream = [("u1", "a", 0), ("u1", "b", 1), ("u2", "a", 2), ("u1", "c", 3), ("u1", "new", 4)]
    recs = [{"user_id": "u1", "event_id": "e0", "items": [{"item_id": "b"}], "variant": "A", "model_version": "v1"},
            {"user_id": "u1", "event_id": "e3", "items": [{"item_id": "new"}], "variant": "A", "model_version": "v2"}]
    rows = freshness.join(stream, recs, 1, known={"a", "b", "c"})
    # e1 'b' was in the list answering e0; e2 has no list; e3 'c' scored against e0's list; e4 'new' hit
    assert [(r["n"], r["hit"], r["new"]) for r in rows] == [(1, True, False), (3, False, False), (4, True, True)]
    assert freshness.rates(rows, "A") == pytest.approx(2 / 3) and freshness.rates(rows, "A", True) == 1.0


def test_small_freshness_run_reports_every_key(tmp_path):
    out, plot = tmp_path / "f.json", tmp_path / "f.png"
    code = cli.main(["bench", "freshness", "--users", "150", "--items", "80", "--prefix", "4000", "--events", "3000",
                     "--rate", "300", "--train-minutes", "0.1", "--learn-interval-s", "3", "--learn-update-s", "1",
                     "--json", str(out), "--plot", str(plot)])
    assert code == 0
    r = json.loads(out.read_text())
    for key in ("frozen_hr", "continual_hr", "new_item_hr_frozen", "new_item_hr_continual", "updates",
                "update_seconds_p50", "learner_cpu_pct", "swap_to_first_served_s"):
        assert key in r, key
    assert r["updates"] >= 1 and r["opportunities"]["A"] > 100 and r["opportunities"]["B"] > 100
    assert 0 < r["learner_cpu_pct"] and plot.stat().st_size > 0
