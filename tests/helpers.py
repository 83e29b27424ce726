"""Helpers shared by the serving tests: a real tiny checkpoint, and the offline reference."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from model.cache import masked_topk
from model.evaluate import worker_seen_policy
from stream_app.pipeline.state import UserState


def train_tiny(out: Path, events: list[dict], catalog: list[dict], seed: int = 0) -> Path:
    """A real checkpoint from `streamrec train`, tiny so it takes seconds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    data, cat = out.parent / f"{out.name}.jsonl", out.parent / f"{out.name}.catalog.jsonl"
    data.write_text("".join(json.dumps(e) + "\n" for e in events))
    cat.write_text("".join(json.dumps(c) + "\n" for c in catalog))
    subprocess.run([sys.executable, "-m", "stream_app.cli", "train", "--data", str(data), "--catalog", str(cat),
                    "--out", str(out), "--dim", "16", "--layers", "2", "--heads", "2", "--window", "6",
                    "--epochs", "2", "--seed", str(seed), "--threads", "1"], check=True, capture_output=True)
    return out


def with_type_rows(ckpt: Path, rows: int) -> None:
    """Rewrite a checkpoint's weights with `rows` type-embedding rows: 5 makes it one trained
    before `dismiss` existed (model/event_types.py, FIRST_TYPES)."""
    from safetensors.torch import load_file, save_file

    from model import checkpoint
    state = load_file(str(ckpt / checkpoint.WEIGHTS))
    emb = state["type_emb.weight"]
    state["type_emb.weight"] = emb[:rows] if rows <= len(emb) else torch.cat([emb, emb[: rows - len(emb)]])
    save_file(state, str(ckpt / checkpoint.WEIGHTS))


def offline_recommend(model, states: list[UserState], k: int,
                      seen_policy: tuple | None = None) -> list[list[tuple[str, float]]]:
    """The reference: a full (untruncated) forward over each stored history, then top-k
    without the items the seen-items policy (default: the worker's) excludes."""
    seen_policy = seen_policy or worker_seen_policy()
    vecs = model.user_vectors([s.raw_events() for s in states], truncate=False)
    items = model.items
    exclude = [[i for i in map(items.lookup, s.seen_items(*seen_policy)) if i] for s in states]
    scores = model.scores(vecs, model.recent_items([s.items() for s in states]))
    scores, idx = masked_topk(scores, k, exclude)
    return [[(items.ids[i], v) for i, v in zip(row_i, row_s)] for row_i, row_s in zip(idx.tolist(), scores.tolist())]


def assert_same_ranking(got: list[tuple[str, float]], want: list[tuple[str, float]], tol: float = 1e-4) -> None:
    """Equal up to ties: the score sequences agree within `tol` position by position, and
    every item clearly inside the offline top-k (not tied with the k-th) is served.
    Items whose scores differ by float noise may legitimately swap places."""
    assert len(got) == len(want), (got, want)
    worst = max((abs(g[1] - w[1]) for g, w in zip(got, want)), default=0.0)
    assert worst <= tol, f"score differs by {worst:.2e}: {got} vs {want}"
    cutoff = want[-1][1] + tol
    clearly_in = {item for item, score in want if score > cutoff}
    missing = clearly_in - {item for item, _ in got}
    assert not missing, f"{missing} missing from {got} (offline {want})"


def wait_until(condition, timeout: float, what: str) -> None:
    """Poll `condition` until true; fail the test naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")
