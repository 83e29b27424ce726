"""The demo's model: trained once per world, cached by what shapes it, and a real
checkpoint the worker can serve."""
from __future__ import annotations

import io
import json

from rich.console import Console

from model import checkpoint
from stream_app.demo.world import cache_key, demo_model


def test_trains_once_then_reuses_the_cached_checkpoint(tmp_path):
    log = io.StringIO()
    console = Console(file=log, width=200)
    first = demo_model(40, 60, 3, tmp_path, console)
    meta = json.loads((first / "checkpoint.json").read_text())
    assert meta["training"]["best"]["val_hr"] > 0 and checkpoint.load(str(first), "cpu") is not None
    assert demo_model(40, 60, 3, tmp_path, console) == first
    assert "training a small transformer" in log.getvalue() and f"cached transformer {first}" in log.getvalue()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no half-written leftovers


def test_cache_key_follows_the_world():
    assert len({cache_key(40, 60, 3), cache_key(41, 60, 3), cache_key(40, 61, 3), cache_key(40, 60, 4)}) == 4
