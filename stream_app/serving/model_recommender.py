"""The transformer in the live pipeline: one incremental step per new event.

Each touched user is either a cache *hit* — their KV cache is tagged with the history
position just before this batch's events, so each new event costs one step — or a
*miss* (never seen, evicted, or a new model version), rebuilt in one batched forward
over the stored raw history. Both paths read the model inputs from the stored history
entries, so streaming and an offline replay of the table agree (docs/design.md, "Exact incremental
inference").
Caches are derived: the pool is bounded by a memory budget and evicts LRU users.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

import torch

from stream_app import metrics
from stream_app.config import Settings
from stream_app.errors import UserError
from model.rules import EMPTY, Rules, apply
from stream_app.pipeline.state import TYPE_CODE, UserState
from stream_app.serving.recommender import CoOccurrenceRecommender, Ranked, Refresh, latest_search, pool_size


class SlotLRU:
    """user -> (cache slot, history position tag), least recently used evicted first."""

    def __init__(self, n_slots: int) -> None:
        self.free = list(range(n_slots - 1, -1, -1))
        self.users: OrderedDict[str, list[int]] = OrderedDict()  # user -> [slot, tag]

    def lookup(self, user_id: str) -> list[int] | None:
        entry = self.users.get(user_id)
        if entry is not None:
            self.users.move_to_end(user_id)
        return entry

    def take(self, user_id: str, protected: set[str]) -> tuple[int, str | None]:
        """A slot for `user_id` (tag -1 = empty), evicting the LRU user not in `protected`."""
        entry = self.users.get(user_id)
        if entry is not None:
            entry[1] = -1
            self.users.move_to_end(user_id)
            return entry[0], None
        evicted = None
        if not self.free:
            evicted = next(u for u in self.users if u not in protected)
            self.free.append(self.users.pop(evicted)[0])
        slot = self.free.pop()
        self.users[user_id] = [slot, -1]
        return slot, evicted

    def drop(self, user_id: str) -> int | None:
        entry = self.users.pop(user_id, None)
        if entry is None:
            return None
        self.free.append(entry[0])
        return entry[0]

    def __len__(self) -> int:
        return len(self.users)


def ann_options(settings: Settings, n_items: int) -> dict | None:
    """ItemScorer's graph options, or None where exact scoring is chosen (docs/design.md,
    "Two-stage retrieval is exact on its candidates")."""
    from model.retrieval import use_ann
    if not use_ann(settings.retrieval, n_items, settings.ann_min_items):
        return None
    return {"candidates": settings.ann_candidates, "ef_search": settings.ann_ef_search,
            "degree": settings.ann_degree, "threads": settings.torch_threads}


@contextmanager
def timed(path: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    metrics.INFERENCE_SECONDS.labels(path).observe(time.perf_counter() - start)


class ModelRecommender:
    """Serves one checkpoint; co-occurrence answers for users the model cannot represent."""

    def __init__(self, model_dir: Path, settings: Settings, variant: str = "default",
                 fallback: CoOccurrenceRecommender | None = None, previous: "ModelRecommender | None" = None) -> None:
        """`previous`: the recommender this one replaces; its HNSW links are kept where the
        new checkpoint allows (docs/design.md, "Two-stage retrieval is exact on its candidates")."""
        from model import checkpoint
        from model.cache import ItemScorer, KVCachePool, pick_device

        device = pick_device(settings.device)
        dtype = torch.bfloat16 if settings.dtype == "bf16" and device.type == "cuda" else torch.float32
        self.model, self.meta = checkpoint.load(str(model_dir), device)
        cfg = self.model.cfg
        if settings.history_max < cfg.receptive_field + 1:
            raise UserError(f"history_max={settings.history_max} is shorter than the model's receptive field "
                            f"({cfg.receptive_field} + 1 events); set STREAMREC_HISTORY_MAX >= {cfg.receptive_field + 1}")
        elem = torch.tensor([], dtype=dtype).element_size()
        per_slot = KVCachePool.slot_bytes(cfg, dtype) + cfg.dim * elem  # + the latest user vector
        self.n_slots = max(1, int(settings.cache_mb * 2**20) // per_slot)
        self.pool = KVCachePool(self.model, self.n_slots, device, dtype)
        graph = getattr(getattr(previous, "scorer", None), "index", None)
        self.scorer = ItemScorer(self.model, ann=ann_options(settings, len(self.model.items)),
                                 previous=(graph, list(previous.model.items.ids)) if graph is not None else None)
        self.scorer.matrix()  # before serving (and off the event loop on a swap): matrix and index
        self.vectors = torch.zeros(self.n_slots, cfg.dim, device=device, dtype=dtype)  # latest per slot
        self.slots = SlotLRU(self.n_slots)
        self.version: str = self.meta["version"]
        self.created_at: float | None = self.meta.get("created_at")  # checkpoints before it: file time
        self.variant = variant
        self.fallback = fallback or CoOccurrenceRecommender(variant, max_entries=settings.fallback_max_entries,
                                                            seen_policy=settings.seen_policy,
                                                            rules_pool=settings.rules_pool, reasons=settings.reasons)
        self.seen_policy = settings.seen_policy
        self.rules_pool, self.reasons = settings.rules_pool, settings.reasons
        self.catalog = None  # set by Lifecycle in the event loop (attaching mutates the catalog)
        self.device = device
        # more new events than this in one batch: rebuild instead (an append holds at most W
        # events, and past ~W a rebuild of the receptive field costs less); -1 = never step
        self.max_steps = min(settings.max_steps_per_batch, cfg.window) if settings.incremental else -1

    # --- Recommender protocol ------------------------------------------------------
    def observe(self, previous_items: Sequence[str], event) -> None:
        self.fallback.observe(previous_items, event)

    def forget(self, user_id: str) -> None:
        slot = self.slots.drop(user_id)
        if slot is not None:
            self.pool.reset(torch.tensor([slot]))

    def recommend(self, batch: Sequence[Refresh], k: int, rules: Rules = EMPTY) -> list[Ranked]:
        out: list[Ranked] = []
        for start in range(0, len(batch), self.n_slots):  # a chunk must fit in the pool at once
            chunk = batch[start:start + self.n_slots]
            servable = [i for i, r in enumerate(chunk) if self._servable(r.state)]
            ranked = dict(zip(servable, self._rank([chunk[i] for i in servable], k, rules))) if servable else {}
            fallback = [r for i, r in enumerate(chunk) if i not in ranked]
            backup = iter(self._as_mine(self.fallback.recommend(fallback, k, rules)) if fallback else [])
            out += [ranked[i] if i in ranked else next(backup) for i in range(len(chunk))]
        return out

    def similar(self, item_id: str, k: int, rules: Rules = EMPTY) -> Ranked:
        """The served score of a one-event history (a click on `item_id`): what follows it,
        by the same function the user lists use, so a catalog item added a second ago has
        neighbours through its content vector. Never the item itself."""
        index = self.model.items.lookup(item_id)
        if not index:  # neither the checkpoint nor the catalog knows it
            return self._as_mine([self.fallback.similar(item_id, k, rules)])[0]
        state = UserState(history=[(item_id, TYPE_CODE["click"], 0.0, "")], count=1)
        vector = self.model.user_vectors([state.raw_events()])
        return self._ranked(vector, [state], k, rules, exclude=[[index]])[0]

    def after_search(self, refresh: Refresh, query: str, ts: float, k: int, rules: Rules = EMPTY) -> Ranked:
        """The user's vector after one more event, a search for `query`, computed by the
        offline forward over the stored history (exact, and no cache slot is touched)."""
        from model.features import RawEvent
        state = refresh.state
        history = state.raw_events(self.model.cfg.receptive_field + 1) + [RawEvent(None, "search", ts, query)]
        vector = self.model.user_vectors([history])
        return self._ranked(vector, [state], k, rules, searches=[query])[0]

    def _as_mine(self, ranked: list[Ranked]) -> list[Ranked]:
        """The fallback is shared by A/B arms: its answers count for this arm's variant."""
        return [Ranked(r.items, r.model_version, self.variant, r.reasons) for r in ranked]

    # --- internals -------------------------------------------------------------------
    def _servable(self, state: UserState) -> bool:
        """The model can represent a user with any known item or any search query."""
        items = self.model.items
        return any(e[3] or items.lookup(e[0]) for e in state.history)

    def _rank(self, refreshes: list[Refresh], k: int, rules: Rules) -> list[Ranked]:
        return self._ranked(self.user_vectors(refreshes), [r.state for r in refreshes], k, rules)

    def _ranked(self, vectors: torch.Tensor, states: list[UserState], k: int, rules: Rules,
                exclude: list[list[int]] | None = None, searches: list[str | None] | None = None) -> list[Ranked]:
        """Top-k by the served score: the seen-items policy (or `exclude`) and availability
        first, then the rules on the best `rules_pool` candidates, then a reason per item."""
        items = self.model.items
        if exclude is None:
            exclude = [[i for i in map(items.lookup, s.seen_items(*self.seen_policy)) if i] for s in states]
        blocked = self.catalog.blocked_indices(items) if self.catalog is not None else None
        histories = [s.items() for s in states]
        recent = self.model.recent_items(histories)
        with timed("score"):
            scores, idx = self.scorer.topk(vectors, pool_size(k, rules, self.rules_pool), exclude, blocked, recent)
        ids = self.scorer.item_ids(idx)
        lists = [[(i, float(s)) for i, s, ok in zip(row_ids, row_s, row_ok) if ok]
                 for row_ids, row_s, row_ok in zip(ids, scores.tolist(), torch.isfinite(scores).tolist())]
        if not rules.empty:
            meta = self.catalog.meta if self.catalog is not None else {}
            with timed("rules"):
                lists = [apply(row, rules, meta, k) for row in lists]
        reasons = None
        if self.reasons:
            with timed("reasons"):
                reasons = self._reasons(states, histories, lists, searches)
        return [Ranked(row, self.version, self.variant, reasons[b] if reasons else None)
                for b, row in enumerate(lists)]

    def _reasons(self, states: list[UserState], histories: list[list[str]], lists: list[list[tuple[str, float]]],
                 searches: list[str | None] | None) -> list[list[str]]:
        from model.reasons import LIKE_WINDOW, explain
        look = self.model.items.lookup
        if searches is None:
            searches = [latest_search(s, self.model.cfg.trans_window) for s in states]
        return explain(self.model, self.scorer.matrix(), [[look(i) for i in h[-LIKE_WINDOW:]] for h in histories],
                       [[look(i) for i, _ in row] for row in lists], searches)

    def user_vectors(self, refreshes: list[Refresh]) -> torch.Tensor:
        """Cache hits take one step per new event; misses are rebuilt together."""
        protected = {r.user_id for r in refreshes}
        slots, hits, misses = [], [], []
        for i, r in enumerate(refreshes):
            n_new = len(r.new_events)
            entry = self.slots.lookup(r.user_id)
            if (entry is not None and entry[1] == r.state.count - n_new
                    and n_new <= min(self.max_steps, len(r.state.history))):
                hits.append(i)
                slots.append(entry[0])
            else:
                slot, evicted = self.slots.take(r.user_id, protected)
                if evicted is not None:
                    metrics.CACHE_EVICTIONS.inc()
                misses.append(i)
                slots.append(slot)
        metrics.CACHE_HITS.inc(len(hits))
        metrics.CACHE_MISSES.inc(len(misses))
        slot_t = torch.tensor(slots, device=self.device)
        if misses:
            self._rebuild([refreshes[i] for i in misses], slot_t[misses])
        self._steps([refreshes[i] for i in hits], slot_t[hits] if hits else slot_t[:0])
        for r in refreshes:
            self.slots.users[r.user_id][1] = r.state.count
        metrics.CACHE_SLOTS.labels("used").set(len(self.slots))
        metrics.CACHE_SLOTS.labels("capacity").set(self.n_slots)
        return self.vectors[slot_t]

    def _rebuild(self, refreshes: list[Refresh], slots: torch.Tensor) -> None:
        depth = self.model.cfg.receptive_field + 1  # +1: the oldest event's time gap
        metrics.REBUILD_BATCH.observe(len(refreshes))
        with timed("rebuild"):
            self.vectors[slots] = self.pool.rebuild(slots, [r.state.raw_events(depth) for r in refreshes])

    def _steps(self, refreshes: list[Refresh], slots: torch.Tensor) -> None:
        """Cache hits advance together: those with one new event by the specialised `step`,
        the rest in one multi-token `append` (both exact, docs/design.md "Exact incremental
        inference")."""
        one = [i for i, r in enumerate(refreshes) if len(r.new_events) == 1]
        more = [i for i, r in enumerate(refreshes) if len(r.new_events) > 1]
        with timed("step"):
            if one:
                self.vectors[slots[one]] = self.pool.step(slots[one], [refreshes[i].state.raw_events(1)[0] for i in one])
            if more:
                self.vectors[slots[more]] = self.pool.append(
                    slots[more], [refreshes[i].state.raw_events(len(refreshes[i].new_events)) for i in more])
