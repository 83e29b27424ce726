"""`streamrec bench quality` as a user runs it, small: train with the defaults (a short
budget), both protocols on valid and test for the hybrid, its terms and the baselines,
the model under every seen-items policy, and a live replay of the hybrid whose lists score
exactly like the offline ranking; then the same report from the saved checkpoint."""
from __future__ import annotations

import argparse
import json

import pytest

from model.synthetic import make_pairs, write_pairs
from stream_app.bench import quality

pytestmark = pytest.mark.integration


def test_quality_report_with_live_replay(tmp_path):
    data = tmp_path / "seq.txt"
    write_pairs(str(data), make_pairs(users=300, items=120, avg_len=10, seed=5, groups=4, p_follow=0.9))
    args = argparse.Namespace(data=str(data), format="auto", catalog=None, max_minutes=0.3, k=10, device="cpu",
                              live=True, live_users=40, out=tmp_path / "model", json=tmp_path / "q.json",
                              plot=tmp_path / "q.png", checkpoint=None)
    assert quality.run(args) == 0
    result = json.loads(args.json.read_text())
    assert result["hybrid"]["entries"] > 0 and "transformer" in result["fitted_on"]
    assert result["winner"]["valid"] in result["valid"]
    for split in ("valid", "test"):
        assert set(result[split]) == {"hybrid", "transformer", "transition", "popularity", "cooccurrence"}
        assert all(result[split][who][p]["users"] > 250 for who in result[split] for p in ("sampled", "full"))
    assert set(result["seen_policies_valid"]) == {"none", "purchased", "interacted"}
    assert result["train"]["epochs"] >= 1 and args.plot.stat().st_size > 0
    live, offline = result["live"]["live"], result["live"]["offline_full"]
    assert live["answered"] == live["users"] == offline["users"] == 40
    # the same ranking up to float noise: at most one user's near-tie at rank 10 may flip
    assert live["hr"] == pytest.approx(offline["hr"], abs=1 / 40 + 1e-9)
    assert live["ndcg"] == pytest.approx(offline["ndcg"], abs=1 / 40 + 1e-9)
    # the blend was chosen on validation with "transformer alone" on its grid
    assert result["valid"]["hybrid"]["full"]["ndcg"] >= result["valid"]["transformer"]["full"]["ndcg"]
    # surfaces: similar items beside co-occurrence; every rule set's lists, none broken
    assert set(result["similar"]) == {"similar (served)", "transformer alone", "transition alone", "cooccurrence"}
    assert all(m["users"] > 250 for m in result["similar"].values())
    rows = result["rules"]["rows"]
    assert "none" in rows and "random rules per user" in rows and all(m["violations"] == 0 for m in rows.values())
    none = rows["none"]
    assert none["hr"] == pytest.approx(result["test"]["hybrid"]["full"]["hr"], abs=0.01)  # lists = full ranking
    assert none["short_lists"] == 0 and rows["max 1 per category"]["users"] == none["users"]

    again = argparse.Namespace(**{**vars(args), "checkpoint": args.out, "live": False, "json": tmp_path / "q2.json"})
    assert quality.run(again) == 0
    assert json.loads(again.json.read_text())["test"] == result["test"]
