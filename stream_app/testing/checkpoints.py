"""Checkpoints the tooling serves: random weights of a given shape for benchmarks."""
from __future__ import annotations

from pathlib import Path


def random_checkpoint(out: Path, items: int, dim: int, layers: int, window: int, neighbors: int = 100) -> str:
    """A random-weight hybrid checkpoint of a given shape, with the synthetic catalog for
    content and a transition table of `neighbors` random successors per item (fewer past
    100k items, at most 10M entries), so benchmarks pay what a trained hybrid costs.

    Benchmarks serve it: what they measure is cost, which does not depend on quality."""
    import numpy as np
    import torch

    from model import checkpoint
    from model.config import ModelConfig
    from model.features import ItemIndex
    from model.transformer import SeqRec
    from model.transition import Transition
    from stream_app.testing.synth import catalog

    torch.manual_seed(0)
    rows = {r["item_id"]: r for r in catalog(items, seed=0)}
    cfg = ModelConfig(n_items=items, dim=dim, n_layers=layers, n_heads=2, window=window,
                      trans_weight=1.0 if neighbors else 0.0)
    model = SeqRec(cfg, ItemIndex(list(rows), cfg, rows))
    per_row = min(neighbors, 10_000_000 // max(items, 1))
    if per_row:
        rng = np.random.default_rng(0)
        src = np.repeat(np.arange(1, items + 1), per_row)
        model.transition = Transition.from_pairs(src, rng.integers(1, items + 1, len(src)), rng.random(len(src)),
                                                 items + 1, per_row)
    return checkpoint.save(str(out), model, {"note": "random weights: benchmarks"})
