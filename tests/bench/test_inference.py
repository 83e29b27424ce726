"""The inference benchmark's measuring code, run small."""
from __future__ import annotations

from model.config import ModelConfig


def test_bench_smoke() -> None:
    """`streamrec bench inference` on a toy model: a row per (history, batch) and the speedup."""
    from stream_app.bench.inference import bench
    from model.features import ItemIndex
    from model.transformer import SeqRec
    cfg = ModelConfig(n_items=50, dim=16, n_layers=2, n_heads=2, window=8, content_buckets=2, query_buckets=2)
    res = bench(SeqRec(cfg, ItemIndex([f"i{i}" for i in range(50)], cfg)).eval(), (12,), (1, 4), steps=2, repeats=1)
    assert res["speedup_h12_b4"] > 0 and len(res["rows"]) == 2
