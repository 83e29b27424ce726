"""Checkpoints on disk (real files, real safetensors): a damaged one is refused with a reason
before anything is allocated, publishing is crash-safe and numbered, and the order of a
model directory follows publish sequence and lineage, not clocks (docs/design.md,
"Published checkpoints are whole")."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch

from model import checkpoint
from model.checkpoint import BadCheckpoint
from model.config import ModelConfig
from model.features import ItemIndex
from model.transformer import SeqRec
from stream_app.errors import UserError
from tests.helpers import with_type_rows

ITEMS = 30


def tiny_model(seed: int = 0) -> SeqRec:
    torch.manual_seed(seed)
    cfg = ModelConfig(n_items=ITEMS, dim=8, n_layers=1, n_heads=2, window=4, content_buckets=2, query_buckets=2,
                      gap_buckets=4)
    return SeqRec(cfg, ItemIndex([f"i{n}" for n in range(ITEMS)], cfg))


def age(ckpt: Path, seconds: float) -> None:
    """Set every file's mtime `seconds` into the past: a publisher with a slow clock."""
    t = time.time() - seconds
    for f in ckpt.iterdir():
        os.utime(f, (t, t))


def edit_meta(ckpt: Path, **changes) -> None:
    doc = json.loads((ckpt / checkpoint.META).read_text())
    for key, value in changes.items():
        if key.startswith("config."):
            doc["config"][key.removeprefix("config.")] = value
        else:
            doc[key] = value
    (ckpt / checkpoint.META).write_text(json.dumps(doc))


@pytest.mark.parametrize("bad", [
    {"dim": 2**20}, {"dim": 10, "n_heads": 3}, {"n_items": 50_000_001}, {"n_layers": 0}, {"n_layers": 65},
    {"window": 65_537}, {"dim": "64"}, {"dim": True}, {"dim": 8.0}, {"dropout": float("nan")}, {"trans_eps": 0},
    {"content_buckets": -1},
])
def test_config_from_json_is_bounded_and_typed(bad):
    with pytest.raises(ValueError):
        ModelConfig.from_dict({**ModelConfig().to_dict(), **bad})


def test_config_from_json_keeps_unknown_and_missing_fields_compatible():
    cfg = ModelConfig.from_dict({"dim": 32, "n_heads": 4, "added_later": 1, "trans_weight": 1})
    assert (cfg.dim, cfg.n_heads, cfg.window, cfg.trans_weight) == (32, 4, ModelConfig().window, 1)


def test_a_checkpoint_from_before_dismiss_loads_and_serves(tmp_path):
    from model.features import RawEvent
    model = tiny_model()
    checkpoint.save(str(tmp_path / "c"), model)
    with_type_rows(tmp_path / "c", 5)
    old, _ = checkpoint.load(str(tmp_path / "c"))
    rows = old.type_emb.weight
    assert rows.shape[0] == 6 and torch.equal(rows[:5], model.type_emb.weight[:5]) and not rows[5].any()
    # a history of the types it knows ranks exactly as before; a dismiss is its item with no type signal
    plain = [RawEvent("i1", "view", 1.0), RawEvent("i2", "click", 2.0), RawEvent(None, "search", 3.0, "shoes")]
    with torch.no_grad():
        assert torch.allclose(old.user_vectors([plain]), model.user_vectors([plain]), atol=1e-6)
        dismissed = plain + [RawEvent("i3", "dismiss", 4.0)]
        u = old.user_vectors([dismissed])
        s = old.scores(u, old.recent_items([["i1", "i2"]]))
    assert torch.isfinite(s).all() and not torch.allclose(u, old.user_vectors([plain]))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


DAMAGE = {  # how a directory can be broken -> the reason it is refused with
    "weights missing (half-copied)": ("incomplete", lambda c: (c / checkpoint.WEIGHTS).unlink()),
    "json missing (half-copied)": ("incomplete", lambda c: (c / checkpoint.META).unlink()),
    "weights garbage": ("corrupt", lambda c: (c / checkpoint.WEIGHTS).write_bytes(b"\x07" * 64)),
    "weights truncated": ("corrupt", lambda c: _truncate(c / checkpoint.WEIGHTS)),
    "json truncated": ("corrupt", lambda c: _truncate(c / checkpoint.META)),
    "json oversized": ("oversized", lambda c: os.truncate(c / checkpoint.META, checkpoint.MAX_META_BYTES + 1)),
    "other format": ("format", lambda c: edit_meta(c, format="streamrec-seqrec/0")),
    "absurd dim": ("config", lambda c: edit_meta(c, **{"config.dim": 2**20})),
    "items not n_items": ("config", lambda c: edit_meta(c, items=["a", "b"])),
    "config not the weights": ("shape", lambda c: edit_meta(c, **{"config.dim": 16})),
    "more layers than weights": ("shape", lambda c: edit_meta(c, **{"config.n_layers": 3})),
    "fewer event types than ever": ("shape", lambda c: with_type_rows(c, 4)),
    "more event types than exist": ("shape", lambda c: with_type_rows(c, 7)),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_with_its_reason(tmp_path, damage):
    reason, do = DAMAGE[damage]
    checkpoint.save(str(tmp_path / "c"), tiny_model())
    checkpoint.load(str(tmp_path / "c"))  # whole, it loads
    do(tmp_path / "c")
    start = time.perf_counter()
    with pytest.raises(BadCheckpoint) as err:
        checkpoint.load(str(tmp_path / "c"))
    assert err.value.reason == reason and reason in checkpoint.REJECT_REASONS
    assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    assert time.perf_counter() - start < 5  # refused before a 2**20-dim model or a 1 GiB read


def test_a_transition_table_of_any_size_loads(tmp_path):
    import numpy as np

    from model.transition import Transition
    model = tiny_model()
    rng = np.random.default_rng(0)
    src = np.repeat(np.arange(1, ITEMS + 1), 3)
    model.transition = Transition.from_pairs(src, rng.integers(1, ITEMS + 1, len(src)), rng.random(len(src)),
                                             ITEMS + 1, 3)
    checkpoint.save(str(tmp_path / "c"), model)
    loaded, _ = checkpoint.load(str(tmp_path / "c"))
    assert loaded.transition.entries == model.transition.entries > 0


def test_publish_numbers_checkpoints_and_sequence_beats_mtime(tmp_path):
    names = [checkpoint.publish(str(tmp_path), tiny_model(n), {}, {"parent": None}) for n in range(3)]
    seqs = [json.loads((tmp_path / n / checkpoint.MANIFEST).read_text())["sequence"] for n in names]
    assert seqs == [1, 2, 3]
    age(tmp_path / names[2], 86_400)  # the newest was published by a host whose clock is a day slow
    age(tmp_path / names[0], -3_600)  # and the oldest by one an hour fast
    assert checkpoint.ordered(tmp_path) == [tmp_path / n for n in reversed(names)]


def test_a_hand_placed_retrain_is_newest_until_a_descendant_is_published(tmp_path):
    v1 = checkpoint.save(str(tmp_path / "v1"), tiny_model(1))
    age(tmp_path / "v1", 7_200)
    s1 = checkpoint.publish(str(tmp_path), tiny_model(2), {}, {"parent": v1})  # the learner, from v1
    age(tmp_path / s1, 86_400)  # slow clock: still newer than its base
    assert checkpoint.ordered(tmp_path)[0] == tmp_path / s1
    v2 = checkpoint.save(str(tmp_path / "v2"), tiny_model(3))  # a full retrain dropped in
    assert checkpoint.ordered(tmp_path) == [tmp_path / "v2", tmp_path / s1, tmp_path / "v1"]
    stale = checkpoint.publish(str(tmp_path), tiny_model(4), {}, {"parent": s1})  # an update begun before v2
    assert checkpoint.ordered(tmp_path)[0] == tmp_path / "v2"
    s2 = checkpoint.publish(str(tmp_path), tiny_model(5), {}, {"parent": v2})  # the learner adopted v2
    age(tmp_path / s2, 86_400)
    assert checkpoint.ordered(tmp_path)[:2] == [tmp_path / s2, tmp_path / "v2"]
    assert tmp_path / stale in checkpoint.ordered(tmp_path)


def test_a_publish_that_raises_leaves_nothing_visible(tmp_path):
    model = tiny_model()
    first = checkpoint.publish(str(tmp_path), model, {}, {"parent": None})
    with pytest.raises(TypeError):  # fails after the weights and half the manifest are written
        checkpoint.publish(str(tmp_path), model, {}, {"parent": first, "bad": object()})
    assert os.listdir(tmp_path) == [first]
    assert checkpoint.ordered(tmp_path) == [tmp_path / first]


def test_prune_keeps_the_newest_by_sequence_and_hand_made_ones(tmp_path):
    checkpoint.save(str(tmp_path / "v1"), tiny_model())
    names = []
    for n in range(4):
        names.append(checkpoint.publish(str(tmp_path), tiny_model(n + 1), {}, {"parent": None}, keep=2))
        age(tmp_path / names[-1], 86_400 * len(names))  # each later one looks older
    assert sorted(os.listdir(tmp_path)) == sorted(["v1", *names[2:]])
