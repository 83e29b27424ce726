"""Which recommender serves: the co-occurrence baseline, one checkpoint, or two side by
side (A/B), each hot-swapped when a newer checkpoint appears in its watched directory.

A swap replaces the serving object between two micro-batches (the processor reads its
recommender once per batch), so no event is lost or processed twice; the new version
starts with empty KV caches (caches are tagged by version, state never is). Loading runs
in a thread so the stream keeps flowing meanwhile.

A checkpoint that does not load is never fatal while an older one does: start-up serves the
newest loadable one, a failed swap keeps the current model, and each failure is logged and
counted once per state of the directory's files (`fingerprint`), so a directory still being
copied in is tried again when it changes (docs/design.md, "Published checkpoints are whole").

A watched directory with nothing loadable yet (missing, empty, or only rejected checkpoints)
is not fatal either: its variant is answered by the co-occurrence baseline and the first
checkpoint that loads is swapped in like any newer one, so a worker started on an empty
model volume stays up until a trainer or learner publishes (docs/design.md, "A model
directory may start empty").
"""
from __future__ import annotations

import asyncio
import logging
import os
import time
import zlib
from pathlib import Path
from typing import Sequence

from stream_app import metrics
from stream_app.config import Settings
from stream_app.errors import UserError
from model.rules import EMPTY, Rules
from stream_app.serving.recommender import CoOccurrenceRecommender, Ranked, Refresh

log = logging.getLogger(__name__)
META = "checkpoint.json"


def checkpoints(path: Path) -> list[Path]:
    """`[path]` if it is a checkpoint, else its checkpoint subdirectories, newest first by
    publish sequence, never by a host's clock (`model.checkpoint.ordered`). Hidden
    directories are checkpoints still being written (docs/design.md, "Published checkpoints
    are whole")."""
    if (path / META).is_file():
        return [path]
    from model.checkpoint import ordered  # torch comes with it: only where a model is served
    return ordered(path) if path.is_dir() else []


def newest_checkpoint(path: Path) -> Path | None:
    """`path` itself if it is a checkpoint, else its newest checkpoint subdirectory."""
    found = checkpoints(path)
    return found[0] if found else None


def fingerprint(ckpt: Path) -> tuple:
    """Names, sizes and mtimes of a directory's files: cheap, and it changes when a copy
    into place progresses, so a checkpoint that failed half-copied is tried again."""
    try:
        return tuple(sorted((e.name, e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(ckpt)
                            if e.is_file()))
    except OSError:
        return ()


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

    def recommend(self, batch: Sequence[Refresh], k: int, rules: Rules = EMPTY) -> list[Ranked]:
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(batch):
            groups.setdefault(variant_of(r.user_id, self.split_b), []).append(i)
        out: list[Ranked | None] = [None] * len(batch)
        for variant, idx in groups.items():
            for i, ranked in zip(idx, self.arms[variant].recommend([batch[i] for i in idx], k, rules)):
                out[i] = ranked
        return out

    def similar(self, item_id: str, k: int, rules: Rules = EMPTY) -> Ranked:
        """An item page has no user to split by: variant A answers."""
        return self.arms["A"].similar(item_id, k, rules)

    def after_search(self, refresh: Refresh, query: str, ts: float, k: int, rules: Rules = EMPTY) -> Ranked:
        return self.arms[variant_of(refresh.user_id, self.split_b)].after_search(refresh, query, ts, k, rules)


class FallbackArm:
    """The shared co-occurrence baseline answering as one A/B variant while that variant's
    directory has no loadable checkpoint: its records and metrics keep the variant's name."""

    def __init__(self, fallback: CoOccurrenceRecommender, variant: str) -> None:
        self.fallback, self.variant, self.version = fallback, variant, fallback.version

    def forget(self, user_id: str) -> None:
        self.fallback.forget(user_id)

    def recommend(self, batch: Sequence[Refresh], k: int, rules: Rules = EMPTY) -> list[Ranked]:
        return [self._mine(r) for r in self.fallback.recommend(batch, k, rules)]

    def similar(self, item_id: str, k: int, rules: Rules = EMPTY) -> Ranked:
        return self._mine(self.fallback.similar(item_id, k, rules))

    def after_search(self, refresh: Refresh, query: str, ts: float, k: int, rules: Rules = EMPTY) -> Ranked:
        return self._mine(self.fallback.after_search(refresh, query, ts, k, rules))

    def _mine(self, r: Ranked) -> Ranked:
        return Ranked(r.items, r.model_version, self.variant, r.reasons)


class Lifecycle:
    """Builds the serving recommender from settings and swaps checkpoints as they appear."""

    def __init__(self, settings: Settings, catalog=None) -> None:
        import torch
        torch.set_num_threads(settings.torch_threads)
        self.settings, self.catalog = settings, catalog
        self.fallback = CoOccurrenceRecommender(max_entries=settings.fallback_max_entries,
                                                seen_policy=settings.seen_policy, rules_pool=settings.rules_pool,
                                                reasons=settings.reasons)
        self.fallback.catalog = catalog
        self.dirs = {"A": settings.model_dir, "B": settings.model_b_dir}
        self._why: dict[Path, str] = {}  # checkpoint -> why it was rejected (one line)
        self.served: dict[str, Path] = {}
        self.failed: dict[Path, tuple] = {}  # checkpoint -> fingerprint of the files that failed
        self.arms: dict[str, object] = {}
        self._waiting_since: dict[str, float] = {}  # variant name -> monotonic time its wait began
        if self.dirs["B"] is not None and self.dirs["A"] is None:
            raise UserError("model_b_dir needs model_dir (variant A) too; set STREAMREC_MODEL_DIR")
        for variant, path in self.dirs.items():
            if path is not None:
                self._start(variant, path)
        self.recommender = self._compose()

    def _start(self, variant: str, path: Path) -> None:
        """Serve the newest checkpoint of `path` that loads; older ones are the fallback.
        Nothing loadable (yet) serves the co-occurrence baseline until `poll` finds one."""
        from model.checkpoint import BadCheckpoint
        found = checkpoints(path)
        for ckpt in found:
            fp = fingerprint(ckpt)
            if self.failed.get(ckpt) == fp:  # variant A already tried this directory
                continue
            try:
                rec = self._load(variant, ckpt)
            except BadCheckpoint as exc:  # a settings error (history_max) is not the checkpoint's fault
                self._reject(ckpt, fp, exc)
                continue
            self._install(variant, rec, ckpt)
            return
        what = f"{len(found)} rejected" if found else "none yet"
        log.warning("no loadable checkpoint in %s (%s): variant %s serves the co-occurrence baseline and "
                    "waits for a checkpoint (checked every %gs; train one with `streamrec train --out %s/v1`)",
                    path, what, self._variant_name(variant), self.settings.model_poll_s, path)

    def _reject(self, ckpt: Path, fp: tuple, exc: Exception) -> None:
        from model.checkpoint import BadCheckpoint
        reason = exc.reason if isinstance(exc, BadCheckpoint) else "error"
        self.failed[ckpt] = fp
        self._why[ckpt] = " ".join(str(exc).split())
        metrics.CHECKPOINT_REJECTED.labels(reason).inc()
        log.error("not serving %s (%s): %s", ckpt, reason, self._why[ckpt])

    def _variant_name(self, variant: str) -> str:
        return variant if self.dirs["B"] is not None else "default"

    def _load(self, variant: str, ckpt: Path):
        from stream_app.serving.model_recommender import ModelRecommender
        served = self.arms.get(variant)  # a waiting arm's fallback has no graph to pass on
        return ModelRecommender(ckpt, self.settings, self._variant_name(variant), self.fallback,
                                previous=served if isinstance(served, ModelRecommender) else None)

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
        """The serving object; a variant with no checkpoint served is the baseline, shown as
        such in streamrec_model_info so "which model answers" is never empty."""
        names = [self._variant_name(v) for v, p in self.dirs.items() if p is not None] or ["default"]
        waiting = {self._variant_name(v) for v, p in self.dirs.items() if p is not None and v not in self.arms}
        for name in names:
            if name in waiting or not self.arms:
                metrics.MODEL_INFO.labels(self.fallback.version, name).set(1)
            else:
                metrics.MODEL_INFO.remove(self.fallback.version, name)
            self._export_waiting(name, name in waiting)
        if self.dirs["B"] is None:
            return self.arms.get("A", self.fallback)
        return ABRouter({v: self.arms.get(v) or FallbackArm(self.fallback, v) for v in ("A", "B")},
                        self.settings.ab_split, self.fallback)

    def _export_waiting(self, name: str, waiting: bool) -> None:
        """streamrec_model_waiting_seconds while a variant with a model directory waits for
        its first loadable checkpoint. streamrec_model_age_seconds exists only for a served
        checkpoint, so without this a worker whose directory is mistyped or never filled
        would serve the baseline forever with no alert (StreamrecNoModel)."""
        if not waiting:
            self._waiting_since.pop(name, None)
            metrics.MODEL_WAITING.remove(name)
        elif name not in self._waiting_since:
            since = self._waiting_since[name] = time.monotonic()
            metrics.MODEL_WAITING.labels(name).set_function(lambda: time.monotonic() - since)

    async def poll(self) -> bool:
        """Swap in the newest checkpoint newer than the served one that loads (loaded in a
        thread); True if something changed. A failure keeps the current model and is not
        retried until the directory's files change."""
        changed = False
        loop = asyncio.get_running_loop()
        visible: set[Path] = set()
        for variant, path in self.dirs.items():
            if path is None:
                continue
            found = checkpoints(path)
            visible.update(found)
            for ckpt in found:
                if ckpt == self.served.get(variant):
                    break  # everything after it is older
                fp = fingerprint(ckpt)
                if self.failed.get(ckpt) == fp:
                    continue
                try:
                    rec = await loop.run_in_executor(None, self._load, variant, ckpt)
                except Exception as exc:  # a broken checkpoint must not take the worker down
                    self._reject(ckpt, fp, exc)
                    continue
                self.failed.pop(ckpt, None)
                self._install(variant, rec, ckpt)
                metrics.MODEL_SWAPS.inc()
                changed = True
                break
        for gone in set(self.failed) - visible:  # removed or renamed: forget it
            self.failed.pop(gone, None)
            self._why.pop(gone, None)
        if changed:
            self.recommender = self._compose()
        return changed
