"""Which recommender serves: the co-occurrence baseline, one checkpoint, or two side by
side (A/B), each hot-swapped when a newer checkpoint appears in its watched directory.

A swap replaces the serving object between two micro-batches (the processor reads its
recommender once per batch), so no event is lost or processed twice; the new version
starts with empty KV caches (caches are tagged by version, state never is). Loading runs
in a thread so the stream keeps flowing meanwhile.
"""
from __future__ import annotations

import asyncio
import logging
import time
import zlib
from pathlib import Path
from typing import Sequence

from stream_app import metrics
from stream_app.config import Settings
from stream_app.errors import UserError
from stream_app.serving.recommender import CoOccurrenceRecommender, Ranked, Refresh

log = logging.getLogger(__name__)
META = "checkpoint.json"


def newest_checkpoint(path: Path) -> Path | None:
    """`path` itself if it is a checkpoint, else its newest checkpoint subdirectory. Hidden
    directories are checkpoints still being written (docs/design.md, "Published checkpoints are whole")."""
    if (path / META).is_file():
        return path
    found = [p for p in path.iterdir() if not p.name.startswith(".") and (p / META).is_file()] if path.is_dir() else []
    return max(found, key=lambda p: ((p / META).stat().st_mtime, p.name), default=None)


def variant_of(user_id: str, split_b: float) -> str:
    """Deterministic A/B split by a stable hash (the same in every worker and restart)."""
    return "B" if zlib.crc32(user_id.encode()) % 10_000 < split_b * 10_000 else "A"


class ABRouter:
    """Two recommenders side by side; each user always sees the same variant."""

    def __init__(self, arms: dict[str, object], split_b: float, fallback: CoOccurrenceRecommender) -> None:
        self.arms, self.split_b, self.fallback = arms, split_b, fallback

    def observe(self, previous_items: Sequence[str], event) -> None:
        self.fallback.observe(previous_items, event)  # shared by both arms: learn once

    def forget(self, user_id: str) -> None:
        for arm in self.arms.values():
            arm.forget(user_id)

    def recommend(self, batch: Sequence[Refresh], k: int) -> list[Ranked]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(batch):
            groups.setdefault(variant_of(r.user_id, self.split_b), []).append(i)
        out: list[Ranked | None] = [None] * len(batch)
        for variant, idx in groups.items():
            for i, ranked in zip(idx, self.arms[variant].recommend([batch[i] for i in idx], k)):
                out[i] = ranked
        return out


class Lifecycle:
    """Builds the serving recommender from settings and swaps checkpoints as they appear."""

    def __init__(self, settings: Settings, catalog=None) -> None:
        import torch
        torch.set_num_threads(settings.torch_threads)
        self.settings, self.catalog = settings, catalog
        self.fallback = CoOccurrenceRecommender(max_entries=settings.fallback_max_entries,
                                                seen_policy=settings.seen_policy)
        self.fallback.catalog = catalog
        self.dirs = {"A": settings.model_dir, "B": settings.model_b_dir}
        self.served: dict[str, Path] = {}
        self.arms: dict[str, object] = {}
        for variant, path in self.dirs.items():
            if path is None:
                continue
            ckpt = newest_checkpoint(path)
            if ckpt is None:
                raise UserError(f"no checkpoint in {path}; train one with `streamrec train --out {path}/v1` "
                                "or unset STREAMREC_MODEL_DIR to serve the co-occurrence baseline")
            self._install(variant, self._load(variant, ckpt), ckpt)
        if self.dirs["B"] is not None and self.dirs["A"] is None:
            raise UserError("model_b_dir needs model_dir (variant A) too; set STREAMREC_MODEL_DIR")
        self.recommender = self._compose()

    def _variant_name(self, variant: str) -> str:
        return variant if self.dirs["B"] is not None else "default"

    def _load(self, variant: str, ckpt: Path):
        from stream_app.serving.model_recommender import ModelRecommender
        return ModelRecommender(ckpt, self.settings, self._variant_name(variant), self.fallback)

    def _install(self, variant: str, rec, ckpt: Path) -> None:
        old = self.arms.get(variant)
        if old is not None:
            metrics.MODEL_INFO.remove(old.version, old.variant)
            if self.catalog is not None:
                self.catalog.detach(old.model.items)
        if self.catalog is not None:
            rec.catalog = self.catalog
            self.catalog.attach(rec.model.items)
        self.arms[variant] = rec
        self.served[variant] = ckpt
        metrics.MODEL_INFO.labels(rec.version, rec.variant).set(1)
        created = rec.created_at or (ckpt / META).stat().st_mtime
        metrics.MODEL_AGE.labels(rec.variant).set_function(lambda: time.time() - created)
        log.info("serving %s as variant %s", rec.version, rec.variant)

    def _compose(self):
        if not self.arms:
            return self.fallback
        if len(self.arms) == 1:
            return self.arms["A"]
        return ABRouter(self.arms, self.settings.ab_split, self.fallback)

    async def poll(self) -> bool:
        """Load any newer checkpoint (in a thread) and swap it in; True if something changed."""
        changed = False
        for variant, path in self.dirs.items():
            if path is None:
                continue
            ckpt = newest_checkpoint(path)
            if ckpt is None or ckpt == self.served.get(variant):
                continue
            try:
                rec = await asyncio.get_running_loop().run_in_executor(None, self._load, variant, ckpt)
            except Exception as exc:  # a broken checkpoint must not take the worker down
                log.error("not swapping to %s: %s", ckpt, exc)
                self.served[variant] = ckpt  # do not retry the same broken directory forever
                continue
            self._install(variant, rec, ckpt)
            metrics.MODEL_SWAPS.inc()
            changed = True
        if changed:
            self.recommender = self._compose()
        return changed
