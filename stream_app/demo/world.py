"""The demo's model: a small transformer trained on the demo's own synthetic world.

The demo exists to show the product's core, the incremental transformer, so it serves
one by default. Training takes well under a minute on 2 cores, with the training
progress on screen, and the checkpoint is cached by everything that shapes it (world
size, seed, model and training settings, the code's format version), so the next run
starts at once. The model learns from the first events of the same endless stream the demo then sends: a model trained on yesterday's traffic of the
same shop. Users whose history holds nothing it knows are answered by co-occurrence,
as in production (docs/model.md).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

# Small enough to train in ~20-40 s on 2 cores (the default world: 2,000 users); smaller
# worlds train on fewer events.
EVENTS_PER_USER, MAX_EVENTS = 30, 60_000
SHAPE = {"dim": 32, "layers": 2, "heads": 2, "window": 16, "dropout": 0.2}
TRAINING = {"epochs": 8, "patience": 2, "max_minutes": 0.75, "seq_len": 32, "valid_users": 1000}
FORMAT = 3  # bump when the training data or recipe changes in a way the settings above do not show


def default_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "streamrec" / "demo"


def train_events(users: int) -> int:
    return min(MAX_EVENTS, EVENTS_PER_USER * users)


def cache_key(users: int, items: int, seed: int) -> str:
    spec = {"users": users, "items": items, "seed": seed, "events": train_events(users), "shape": SHAPE,
            "training": TRAINING, "format": FORMAT}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:12]


def demo_model(users: int, items: int, seed: int, cache: Path, console: Console) -> Path:
    """A checkpoint directory for this world: the cached one, or one trained now."""
    out = cache / f"u{users}-i{items}-s{seed}-{cache_key(users, items, seed)}"
    if (out / "checkpoint.json").is_file():
        console.print(f"model: cached transformer {out}")
        return out
    cache.mkdir(parents=True, exist_ok=True)
    console.print(f"model: training a small transformer on {train_events(users):,} synthetic events "
                  f"(once; cached in {cache})")
    with tempfile.TemporaryDirectory(prefix="train-", dir=cache) as tmp:
        _train(users, items, seed, Path(tmp), console)
        try:
            os.replace(Path(tmp) / "model", out)  # atomic: a concurrent demo never sees half a checkpoint
        except OSError:  # another demo finished the same model first
            if not (out / "checkpoint.json").is_file():
                raise
    return out


def _train(users: int, items: int, seed: int, workdir: Path, console: Console) -> None:
    import torch

    from model.data import load
    from model.train import TrainConfig, model_config_for, train
    from stream_app.testing.synth import generate

    events, catalog = generate(users, items, train_events(users), seed)
    data, rows = workdir / "events.jsonl", workdir / "catalog.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in events))
    rows.write_text("".join(json.dumps(c) + "\n" for c in catalog))
    ds = load(str(data), "jsonl", str(rows))
    mc = model_config_for(ds, **SHAPE)
    tc = TrainConfig(**{**asdict(TrainConfig()), **TRAINING, "seed": seed})
    train(ds, mc, tc, torch.device("cpu"), str(workdir / "model"))
