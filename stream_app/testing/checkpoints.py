"""Checkpoints the tooling serves: random weights of a given shape for benchmarks."""
from __future__ import annotations

from pathlib import Path


def random_checkpoint(out: Path, items: int, dim: int, layers: int, window: int) -> str:
    """A random-weight checkpoint of a given shape, with the synthetic catalog for content.

    Benchmarks serve it: what they measure is cost, which does not depend on quality."""
    import torch

    from model import checkpoint
    from model.config import ModelConfig
    from model.features import ItemIndex
    from model.transformer import SeqRec
    from stream_app.testing.synth import catalog

    torch.manual_seed(0)
    rows = {r["item_id"]: r for r in catalog(items, seed=0)}
    cfg = ModelConfig(n_items=items, dim=dim, n_layers=layers, n_heads=2, window=window)
    model = SeqRec(cfg, ItemIndex(list(rows), cfg, rows))
    return checkpoint.save(str(out), model, {"note": "random weights: benchmarks"})
