"""Which checkpoint a worker serves, with real checkpoint directories on disk: a bad newest
one never blocks start-up (the next loadable one serves), a failed hot swap keeps the
current model and is retried only when the directory's files change, so a half-copied
checkpoint is served once complete; the order is publish sequence, not mtime
(docs/design.md, "Published checkpoints are whole")."""
from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path

import pytest

from model import checkpoint
from stream_app import metrics
from stream_app.config import Settings
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


def model_info(version: str, variant: str = "default") -> float | None:
    return metrics.REGISTRY.get_sample_value("streamrec_model_info", {"version": version, "variant": variant})


def waiting(variant: str = "default") -> float | None:
    return metrics.REGISTRY.get_sample_value("streamrec_model_waiting_seconds", {"variant": variant})


def test_startup_with_nothing_loadable_serves_the_baseline_and_counts_the_rejects(models, caplog):
    """A worker that stays up is what an orchestrator needs (docs/design.md, "A model
    directory may start empty"): broken checkpoints are counted and logged, not fatal."""
    root, names = models
    for name in names:
        (root / name / checkpoint.WEIGHTS).write_bytes(b"broken")
    before = rejected("corrupt")
    life = Lifecycle(settings(root))
    assert life.recommender is life.fallback and not life.served
    assert rejected("corrupt") == before + 3
    assert "3 rejected" in caplog.text and "waits for a checkpoint" in caplog.text
    assert model_info("cooccurrence-v1") == 1 and waiting() >= 0


@pytest.mark.parametrize("empty", ["missing", "empty dir"])
def test_an_empty_model_dir_serves_the_baseline_then_swaps_in_the_first_checkpoint(tmp_path, empty, caplog):
    root = tmp_path / "models"
    if empty == "empty dir":
        root.mkdir()
    life = Lifecycle(settings(root))
    assert life.recommender is life.fallback and not life.served
    assert [r.message for r in caplog.records if "waits for a checkpoint" in r.message][0].count("\n") == 0
    assert model_info("cooccurrence-v1") == 1
    assert not asyncio.run(life.poll())  # still nothing: no change, no reject counted
    before = swaps()
    v1 = checkpoint.save(str(tmp_path / "staging" / "v1"), tiny_model(0))
    (root).mkdir(exist_ok=True)
    (tmp_path / "staging" / "v1").rename(root / "v1")  # published by a rename, as the learner does
    assert asyncio.run(life.poll())
    assert life.served["A"] == root / "v1" and life.recommender.version == v1 and swaps() == before + 1
    assert model_info(v1) == 1 and model_info("cooccurrence-v1") is None
    assert metrics.REGISTRY.get_sample_value("streamrec_model_age_seconds", {"variant": "default"}) >= 0


def test_ab_with_one_empty_arm_answers_that_variant_with_the_baseline(models, tmp_path):
    from stream_app.pipeline.state import UserState
    from stream_app.serving.recommender import Refresh
    root, (_, s1, s2) = models
    (tmp_path / "b").mkdir()
    life = Lifecycle(Settings(model_dir=root, model_b_dir=tmp_path / "b", ab_split=0.5, cache_mb=1.0))
    assert set(life.served) == {"A"} and model_info("cooccurrence-v1", "B") == 1
    assert waiting("B") >= 0 and waiting("A") is None
    known = UserState(history=[("i1", 1, 1.0, "")], count=1)  # an item the model knows: it answers
    batch = [Refresh(f"u{n}", known, ()) for n in range(40)]
    out = {(r.variant, r.model_version) for r in life.recommender.recommend(batch, 5)}
    assert out == {("A", s2), ("B", "cooccurrence-v1")}
    shutil.copytree(root / s1, tmp_path / "b" / "v1")
    assert asyncio.run(life.poll()) and set(life.served) == {"A", "B"}
    assert model_info("cooccurrence-v1", "B") is None and waiting("B") is None


def test_a_variant_waiting_for_its_first_checkpoint_exports_how_long(tmp_path):
    """The gauge behind StreamrecNoModel (deploy/prometheus/alerts.yml): none without a
    model directory (the baseline on purpose), present and growing from the start of the
    wait while the directory has nothing loadable, gone once a checkpoint serves."""
    Lifecycle(Settings(model_dir=""))
    assert waiting() is None
    root = tmp_path / "models"
    life = Lifecycle(settings(root))
    first = waiting()
    assert first is not None and first >= 0
    time.sleep(0.05)
    assert not asyncio.run(life.poll())  # still nothing: the wait goes on, counted from its start
    assert waiting() >= first + 0.05
    checkpoint.save(str(root / "v1"), tiny_model(0))
    assert asyncio.run(life.poll()) and life.served["A"] == root / "v1"
    assert waiting() is None
    assert metrics.REGISTRY.get_sample_value("streamrec_model_age_seconds", {"variant": "default"}) >= 0


def test_empty_model_dir_setting_means_none(monkeypatch):
    monkeypatch.setenv("STREAMREC_MODEL_DIR", "")
    monkeypatch.setenv("STREAMREC_MODEL_B_DIR", "")
    assert Settings().model_dir is None and Settings().model_b_dir is None
    assert Settings(model_dir="").model_dir is None
    assert Lifecycle(Settings(model_dir="")).recommender.version == "cooccurrence-v1"


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
