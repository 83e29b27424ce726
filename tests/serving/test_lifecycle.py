"""Which checkpoint a worker serves, with real checkpoint directories on disk: a bad newest
one never blocks start-up (the next loadable one serves), a failed hot swap keeps the
current model and is retried only when the directory's files change, so a half-copied
checkpoint is served once complete; the order is publish sequence, not mtime
(docs/design.md, "Published checkpoints are whole")."""
from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest

from model import checkpoint
from stream_app import metrics
from stream_app.config import Settings
from stream_app.errors import UserError
from stream_app.serving.lifecycle import Lifecycle, newest_checkpoint
from tests.model.test_checkpoint import DAMAGE, age, tiny_model


def rejected(reason: str) -> float:
    return metrics.REGISTRY.get_sample_value("streamrec_checkpoint_rejected_total", {"reason": reason}) or 0.0


def swaps() -> float:
    return metrics.REGISTRY.get_sample_value("streamrec_model_swaps_total") or 0.0


@pytest.fixture
def models(tmp_path) -> tuple[Path, list[str]]:
    """A model directory as a learner leaves it: a hand-placed v1 and two published updates."""
    root = tmp_path / "models"
    v1 = checkpoint.save(str(root / "v1"), tiny_model(0))
    s1 = checkpoint.publish(str(root), tiny_model(1), {}, {"parent": v1})
    s2 = checkpoint.publish(str(root), tiny_model(2), {}, {"parent": s1})
    return root, ["v1", s1, s2]


def settings(root: Path) -> Settings:
    return Settings(model_dir=root, cache_mb=1.0)


@pytest.mark.parametrize("damage", ["weights missing (half-copied)", "weights garbage", "weights truncated",
                                    "json oversized", "absurd dim", "config not the weights"])
def test_startup_falls_back_past_a_bad_newest_checkpoint(models, damage):
    root, (_, s1, s2) = models
    reason, do = DAMAGE[damage]
    do(root / s2)
    before = rejected(reason)
    life = Lifecycle(settings(root))
    assert life.served["A"] == root / s1 and life.recommender.version == s1
    assert rejected(reason) == before + 1
    assert not asyncio.run(life.poll())  # the same broken files are not tried again
    assert rejected(reason) == before + 1 and life.served["A"] == root / s1


def test_startup_with_nothing_loadable_is_one_line(models, tmp_path):
    root, names = models
    for name in names:
        (root / name / checkpoint.WEIGHTS).write_bytes(b"broken")
    with pytest.raises(UserError, match="no loadable checkpoint in") as err:
        Lifecycle(settings(root))
    assert "\n" not in str(err.value) and "3 rejected" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no checkpoint in"):
        Lifecycle(settings(tmp_path / "empty"))


def test_sequence_beats_mtime_at_startup(models):
    root, (_, s1, s2) = models
    age(root / s2, 86_400)  # published by a learner whose clock is a day slow
    age(root / s1, -3_600)
    assert newest_checkpoint(root) == root / s2
    assert Lifecycle(settings(root)).served["A"] == root / s2


def test_hot_swap_keeps_serving_until_a_half_copied_checkpoint_is_complete(models, tmp_path):
    root, (_, s1, s2) = models
    life = Lifecycle(settings(root))
    assert life.served["A"] == root / s2
    # a full retrain arrives by a copy into place (cp -r from another host), file by file
    src, dst = tmp_path / "staging" / "v2", root / "v2"
    v2 = checkpoint.save(str(src), tiny_model(3))
    dst.mkdir()
    shutil.copy2(src / checkpoint.META, dst / checkpoint.META)
    assert newest_checkpoint(root) == dst
    missing, corrupt, swapped = rejected("incomplete"), rejected("corrupt"), swaps()
    assert not asyncio.run(life.poll())  # weights not there yet
    assert life.served["A"] == root / s2 and rejected("incomplete") == missing + 1
    assert not asyncio.run(life.poll())  # unchanged files: not retried, not counted again
    assert rejected("incomplete") == missing + 1
    data = (src / checkpoint.WEIGHTS).read_bytes()
    (dst / checkpoint.WEIGHTS).write_bytes(data[: len(data) // 2])
    assert not asyncio.run(life.poll())  # half the weights: tried again, still refused
    assert life.served["A"] == root / s2 and rejected("corrupt") == corrupt + 1
    with open(dst / checkpoint.WEIGHTS, "ab") as f:
        f.write(data[len(data) // 2:])
    assert asyncio.run(life.poll())  # complete: served
    assert life.served["A"] == dst and life.recommender.version == v2 and swaps() == swapped + 1
    assert dst not in life.failed


def test_hot_swap_skips_a_bad_newest_for_a_good_newer_one_and_rolls_back(models):
    root, (_, s1, s2) = models
    shutil.rmtree(root / s2)
    life = Lifecycle(settings(root))
    assert life.served["A"] == root / s1
    s2 = checkpoint.publish(str(root), tiny_model(2), {}, {"parent": s1})
    s3 = checkpoint.publish(str(root), tiny_model(3), {}, {"parent": s2})
    (root / s3 / checkpoint.WEIGHTS).write_bytes(b"broken")
    assert asyncio.run(life.poll())  # s3 refused, s2 is still newer than what serves
    assert life.served["A"] == root / s2
    shutil.rmtree(root / s3)
    shutil.rmtree(root / s2)  # rolled back by hand: the previous newest serves again
    assert asyncio.run(life.poll()) and life.served["A"] == root / s1
    assert not life.failed


def test_same_directory_for_both_arms_is_tried_once(models):
    root, (_, s1, s2) = models
    (root / s2 / checkpoint.META).write_text("{")
    before = rejected("corrupt")
    life = Lifecycle(Settings(model_dir=root, model_b_dir=root, ab_split=0.5, cache_mb=1.0))
    assert life.served == {"A": root / s1, "B": root / s1}
    assert rejected("corrupt") == before + 1


def test_a_swap_the_settings_cannot_serve_is_counted_as_error_and_keeps_serving(models):
    from model.config import ModelConfig
    from model.features import ItemIndex
    from model.transformer import SeqRec
    root, (_, s1, s2) = models
    life = Lifecycle(Settings(model_dir=root, cache_mb=1.0, history_max=20))
    cfg = ModelConfig(n_items=5, dim=8, n_layers=2, n_heads=2, window=16, content_buckets=2, query_buckets=2)
    deep = checkpoint.publish(str(root), SeqRec(cfg, ItemIndex([f"i{n}" for n in range(5)], cfg)), {},
                              {"parent": s2})  # receptive field 31 > history_max 20
    before = rejected("error")
    assert not asyncio.run(life.poll())
    assert life.served["A"] == root / s2 and rejected("error") == before + 1 and root / deep in life.failed
    assert set(metrics.CHECKPOINT_REJECT_REASONS) == {*checkpoint.REJECT_REASONS, "error"}
