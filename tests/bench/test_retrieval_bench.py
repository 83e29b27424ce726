"""`streamrec bench retrieval` as a user runs it: random and trained-checkpoint matrices, the
table's figures, JSON and plot; and the served-quality comparison (exact vs two-stage)."""
from __future__ import annotations

import argparse
import json

import torch

from stream_app.bench import retrieval
from stream_app.testing.checkpoints import random_checkpoint


def test_random_and_checkpoint_matrices(tmp_path):
    random_checkpoint(tmp_path / "ckpt", 600, 16, 1, 5)
    args = argparse.Namespace(items=[2000], checkpoint=[tmp_path / "ckpt"], data=[], queries=200, batch=40,
                              candidates=50, ef_search=64, degree=16, json=tmp_path / "r.json", plot=tmp_path / "r.png")
    assert retrieval.run(args) == 0
    rows = json.loads(args.json.read_text())["rows"]
    assert [r["matrix"] for r in rows] == ["random", "trained:ckpt", "trained:ckpt:resampled"]
    assert [r["items"] for r in rows] == [2000, 600, 2000]
    for r in rows:
        assert 0.9 <= r["recall_at_10"] <= 1.0
        assert r["exact_us_per_query"] > 0 and r["ann_us_per_query"] > 0 and r["index_mb"] > 0
    assert args.plot.stat().st_size > 0


def test_served_quality_is_unchanged_where_the_graph_finds_everything(tmp_path):
    from model import checkpoint
    random_checkpoint(tmp_path / "ckpt", 800, 16, 1, 5)
    model, _ = checkpoint.load(str(tmp_path / "ckpt"), torch.device("cpu"))
    with torch.no_grad():
        M = model.item_matrix()
    g = torch.Generator().manual_seed(0)
    Q = M[torch.randint(1, len(M), (120,), generator=g)] * 3
    recent = [[int(i)] for i in torch.randint(1, len(M), (120,), generator=g)]
    with torch.inference_mode():
        exact = torch.topk(model.scores(Q, recent, M)[:, 1:], 10).indices + 1
    targets = exact[:, 3].tolist()  # each user's 4th-ranked item is "the next item"
    args = argparse.Namespace(batch=40, candidates=200, ef_search=256, degree=32)
    q = retrieval.served_quality(model, Q, recent, targets, args)
    assert q["exact"]["hr_at_10"] == 1.0 and abs(q["exact"]["ndcg_at_10"] - 1 / 2.321928) < 1e-3
    assert abs(q["ndcg_change_pct"]) <= 1.0
