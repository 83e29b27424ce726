"""Model hyper-parameters, saved verbatim in every checkpoint's JSON.

Everything that changes the function the network computes lives here, so a checkpoint
directory alone is enough to rebuild the exact model (docs/design.md, "No unsafe
deserialisation").
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

# Each integer field's sane range (inclusive). The largest product a checkpoint is allowed
# is still checked against its weights' shapes before allocation (model/checkpoint.py).
INT_BOUNDS = {
    "n_items": (0, 50_000_000), "dim": (1, 4096), "n_layers": (1, 64), "n_heads": (1, 256),
    "window": (1, 65_536), "mlp_mult": (1, 16), "content_buckets": (1, 1 << 24), "query_buckets": (1, 1 << 24),
    "gap_buckets": (1, 4096), "max_content_tokens": (1, 4096), "max_query_ngrams": (1, 4096), "ngram": (1, 64),
    "trans_window": (1, 65_536),
}


@dataclass(frozen=True)
class ModelConfig:
    n_items: int = 0                 # trained item vocabulary (id-embedding rows = n_items + 1; row 0 = OOV)
    dim: int = 64
    n_layers: int = 2
    n_heads: int = 2
    window: int = 50                 # W: band-attention width, identical in training and serving
    mlp_mult: int = 4
    dropout: float = 0.3
    content_buckets: int = 1 << 16   # hashed title/category tokens
    query_buckets: int = 1 << 15     # hashed character n-grams of search queries
    gap_buckets: int = 32            # bucket 0 = unknown gap; 1 + floor(log2(1 + seconds)) otherwise
    max_content_tokens: int = 16
    max_query_ngrams: int = 48
    ngram: int = 3
    # hybrid score (model/transition.py): + trans_weight * log(1 + t_u(i) / trans_eps) over the
    # user's last trans_window items; weight and eps are chosen on validation by `streamrec train`
    trans_window: int = 5
    trans_weight: float = 0.0        # 0 = the transformer alone
    trans_eps: float = 0.01

    def __post_init__(self) -> None:
        """Bounds on every field: a checkpoint's config sizes the tensors the model allocates,
        so an absurd one (dim 2**20 from a damaged or hostile checkpoint.json) must be refused
        before anything is built (docs/design.md, "Published checkpoints are whole")."""
        for name, (low, high) in INT_BOUNDS.items():
            value = getattr(self, name)
            if not low <= value <= high:
                raise ValueError(f"{name}={value} is outside [{low}, {high}]")
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} must be divisible by n_heads {self.n_heads}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout={self.dropout} must be in [0, 1)")
        if not (0 <= self.trans_weight < math.inf and 0 < self.trans_eps < math.inf):
            raise ValueError("trans_weight must be finite and >= 0, trans_eps finite and > 0")

    @property
    def receptive_field(self) -> int:
        """Events that can influence the newest output: each band layer looks W-1 steps back.

        A rebuild from this many events (plus one older event for its time gap) is exact.
        """
        return self.n_layers * (self.window - 1) + 1

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """From a checkpoint's JSON: fields it does not know are ignored, missing ones take
        the defaults (older checkpoints), and each value must have its field's type
        (ValueError otherwise), so `__post_init__` compares numbers, never strings."""
        if not isinstance(d, dict):
            raise ValueError(f"config must be an object, not {type(d).__name__}")
        kinds = {f.name: type(f.default) for f in fields(cls)}
        out = {k: v for k, v in d.items() if k in kinds}
        for k, v in out.items():
            ok = isinstance(v, int) if kinds[k] is int else isinstance(v, (int, float))
            if not ok or isinstance(v, bool):
                raise ValueError(f"{k}={v!r} must be {'an integer' if kinds[k] is int else 'a number'}")
        return cls(**out)


@dataclass(frozen=True)
class LearnConfig:
    """Continual learning (model/continual.py); `streamrec learn` maps its settings onto these."""
    interval_s: float = 300.0     # an update at least this often (wall time live, event time offline)
    every_events: int = 50_000    # ... or after this many events, whichever first
    min_events: int = 200         # fewer new events than this never make an update
    memory_mb: float = 256.0      # recent per-user histories (3/4) and the replay sample (1/4)
    history: int = 100            # events kept per user (>= the default model's receptive field, 99)
    replay_share: float = 0.5     # replay sequences per recent sequence in each fine-tune
    update_s: float = 60.0        # fine-tune wall-clock budget per update
    epochs: int = 1               # passes over the recent window per update
    lr: float = 5e-4
    batch_size: int = 128
    min_item_events: int = 5      # events before a new item gets its own ID row
    holdout_share: float = 0.1    # the window's most recent item events: the gate's test set ...
    holdout_max: int = 2000       # ... at most this many (enough to rank two models, cheap to score)
    margin: float = 0.0           # candidate NDCG@k must exceed serving's by more than this
    eval_window: int = 2000       # rolling prequential metrics: last N scored events
    k: int = 10
    seed: int = 0
