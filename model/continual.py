"""Continual learning: every served event is first a test, then a training example.

The `Learner` is the whole algorithm and knows nothing of Kafka, so `streamrec learn`
(live, stream_app/runtime/learner.py) and `streamrec eval --protocol prequential`
(offline, model/prequential.py) run the same code (docs/model.md, "Continual learning"):

1. observe: before an event trains anything, the serving model and the current candidate
   rank the user's next item from the history before it (test-then-train, in batches);
2. every `interval_s` or `every_events`, whichever first, an update warm-starts from the
   *serving* model, grows the vocabulary (model/vocab.py), fine-tunes for at most
   `update_s` on the recent window mixed with a replay sample of older sequences, and
   gates the candidate on the window's most recent events, held out of its training;
3. a candidate that beats the serving model by `margin` NDCG@k is published and becomes
   the serving model; otherwise it is kept aside with its reason.
"""
from __future__ import annotations

import copy
import random
import time
from collections import Counter, OrderedDict, deque
from typing import Callable, Sequence

import numpy as np
import torch

from model.config import LearnConfig
from model.evaluate import rank_values
from model.event_types import positive
from model.features import RawEvent, item_ids
from model.seen import excluded
from model.loss import item_loss
from model.train import (FULL_SOFTMAX_MAX_ITEMS, TrainConfig, batch_rows, length_batches,
                         training_tensors)
from model.transformer import SeqRec
from model.vocab import grow, neighbours, untrained

EVENT_BYTES = 200      # one kept RawEvent with its strings, for the memory budget
NEW_ITEM_AGE_S = 86_400.0
SCORE_BATCH = 256
MAX_COUNTED_ITEMS = 1_000_000
MAX_NEW_ITEMS_PER_UPDATE = 10_000  # the most-seen first: invented ids cannot grow the vocabulary without bound
MAX_CLOCK_SKEW_S = 300.0           # an event's own time counts at most this far ahead of the learner's clock


def first_number(entry: list) -> int:
    """Event number (1 = the user's first ever) of the oldest event a users entry still keeps."""
    hist, total = entry
    return total - len(hist) + 1


class Rolling:
    """HR/NDCG/MRR of one model over the last N scored events, and over the whole run."""

    def __init__(self, n: int) -> None:
        self.recent: deque[tuple[float, float]] = deque(maxlen=n)
        self.total = np.zeros(3)
        self.count = 0

    def add(self, hr: np.ndarray, ndcg: np.ndarray, mrr: np.ndarray) -> None:
        self.recent.extend(zip(hr.tolist(), ndcg.tolist()))
        self.total += (hr.sum(), ndcg.sum(), mrr.sum())
        self.count += len(hr)

    def hr(self) -> float:
        return sum(h for h, _ in self.recent) / len(self.recent) if self.recent else 0.0

    def ndcg(self) -> float:
        return sum(n for _, n in self.recent) / len(self.recent) if self.recent else 0.0

    def summary(self) -> dict[str, float]:
        hr, ndcg, mrr = self.total / max(self.count, 1)
        return {"hr": float(hr), "ndcg": float(ndcg), "mrr": float(mrr), "events": self.count}


def rank_targets(model: SeqRec, contexts: Sequence[Sequence[RawEvent]], targets: Sequence[str],
                 seen_policy: tuple) -> tuple[np.ndarray, np.ndarray]:
    """(greater, ties) of each target among the model's items, with the worker's seen-items
    exclusion; a target the model cannot rank (unknown or excluded) scores as a miss."""
    items = model.items
    with torch.no_grad():
        u = model.user_vectors(contexts).float()
        recent = model.recent_items([item_ids(c) for c in contexts])
        s = model.scores(u, recent, model.item_matrix().float()).cpu().numpy().astype(np.float64)
    s[:, 0] = -np.inf  # OOV row is never a recommendation
    n = s.shape[1]
    greater, ties = np.full(len(targets), n, np.int64), np.zeros(len(targets), np.int64)
    for r, (ctx, target) in enumerate(zip(contexts, targets)):
        col = items.index.get(target)
        seen = excluded(((e.item_id, e.type, e.ts) for e in ctx), *seen_policy)
        if col is None or target in seen:
            continue
        row = s[r]
        row[[items.index[i] for i in seen if i in items.index]] = -np.inf
        t = row[col]
        greater[r], ties[r] = int((row > t).sum()), int((row == t).sum()) - 1
    return greater, ties


class Learner:
    """Test-then-train over a stream of (user, event); see the module docstring."""

    def __init__(self, serving: SeqRec, cfg: LearnConfig, seen_policy: tuple = ("interacted", 0),
                 publish: Callable[[SeqRec, dict], str | None] | None = None,
                 tracked: dict[str, SeqRec] | None = None) -> None:
        self.cfg, self.seen_policy, self.publish = cfg, seen_policy, publish
        self.serving = self.candidate = serving.eval()
        self.tracked = dict(tracked or {})           # extra models scored side by side (offline: frozen)
        self.known = set(serving.items.index)          # items the starting model knew: never "new"
        self.users: OrderedDict[str, list] = OrderedDict()  # user -> [deque of events, events ever seen]
        self.kept = 0                                  # events in self.users
        self.replay: list[tuple[str, tuple[RawEvent, ...]]] = []  # (user, an older sequence of theirs)
        self.replay_offered = 0
        budget = cfg.memory_mb * 1e6 / EVENT_BYTES
        self.recent_budget, self.replay_slots = int(budget * 0.75), max(1, int(budget * 0.25 / cfg.history))
        self.counts: Counter[str] = Counter()          # events per item not yet in the vocabulary
        self.first_seen: dict[str, float] = {}
        self.window: list[tuple[str, int]] = []        # (user, event number) since the last update
        self.pending: list[tuple[tuple[RawEvent, ...], str, bool]] = []
        self.metrics: dict[str, Rolling] = {}
        self.new_item_metrics: dict[str, Rolling] = {}
        self.updates = 0
        self.last_update: float | None = None
        self.rng = random.Random(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)

    # ---- the stream ------------------------------------------------------------------
    def observe(self, user: str, ev: RawEvent, now: float, test: bool = True) -> None:
        """Take one event: test the models on it (if it takes an item and has a history), then
        keep it. A dismiss is kept as an input, never a test or a target (model/event_types.py).
        `test=False` only warms the history (events the starting model was trained on)."""
        if self.last_update is None:
            self.last_update = now
        entry = self.users.get(user)
        if entry is None:
            entry = self.users[user] = [deque(maxlen=self.cfg.history), 0]
        else:
            self.users.move_to_end(user)
        hist = entry[0]
        is_item = positive(ev.item_id, ev.type)
        ts = min(ev.ts, now + MAX_CLOCK_SKEW_S)  # a far-future timestamp must not keep an item "new" for ever
        if is_item and ev.item_id not in self.known and ev.item_id not in self.first_seen:
            self._first_seen(ev.item_id, ts)
        if test and is_item and hist:
            young = ev.item_id not in self.known and ts - self.first_seen.get(ev.item_id, -1e18) < NEW_ITEM_AGE_S
            self.pending.append((tuple(hist), ev.item_id, young))
            if len(self.pending) >= SCORE_BATCH:
                self.score_pending()
        self.kept += len(hist) < self.cfg.history
        hist.append(ev)
        entry[1] += 1
        if is_item and untrained(self.serving, ev.item_id):
            self._count_new(ev.item_id)
        if test:
            self.window.append((user, entry[1]))
        self._evict()

    def _first_seen(self, item: str, ts: float) -> None:
        """When an unknown item first appeared; items older than a day are dropped when it grows."""
        self.first_seen[item] = ts
        if len(self.first_seen) > MAX_COUNTED_ITEMS:
            kept = {i: t for i, t in self.first_seen.items() if abs(ts - t) < NEW_ITEM_AGE_S}
            if len(kept) > MAX_COUNTED_ITEMS // 2:  # a flood of new ids within a day: keep the newest half
                kept = dict(list(kept.items())[-(MAX_COUNTED_ITEMS // 2):])
            self.first_seen = kept

    def _count_new(self, item: str) -> None:
        """Events per not-yet-trained item; a stream of junk IDs cannot grow it without bound."""
        self.counts[item] += 1
        if len(self.counts) > MAX_COUNTED_ITEMS:
            kept = Counter({i: c for i, c in self.counts.items() if c > 1})
            if len(kept) > MAX_COUNTED_ITEMS // 2:  # ids sent twice each: keep the most-seen half
                kept = Counter(dict(kept.most_common(MAX_COUNTED_ITEMS // 2)))
            self.counts = kept

    def _evict(self) -> None:
        """Least recently active users leave the recent set for the replay sample."""
        while self.kept > self.recent_budget and len(self.users) > 1:
            user, (hist, _) = self.users.popitem(last=False)
            self.kept -= len(hist)
            self._offer_replay(user, tuple(hist))

    def _offer_replay(self, user: str, seq: tuple[RawEvent, ...]) -> None:
        """Reservoir sampling: every sequence ever offered is equally likely to be kept."""
        self.replay_offered += 1
        if len(self.replay) < self.replay_slots:
            self.replay.append((user, seq))
            return
        j = self.rng.randrange(self.replay_offered)
        if j < self.replay_slots:
            self.replay[j] = (user, seq)

    def forget(self, user: str) -> None:
        """Erase a user from everything the learner keeps (the `forget` control event)."""
        self.score_pending()
        entry = self.users.pop(user, None)
        if entry is not None:
            self.kept -= len(entry[0])
        self.replay = [r for r in self.replay if r[0] != user]
        self.window = [w for w in self.window if w[0] != user]

    def serve(self, model: SeqRec) -> None:
        """A model published elsewhere (a full retrain) becomes the base of the next updates."""
        self.serving = self.candidate = model.eval()

    def due(self, now: float) -> bool:
        if len(self.window) < min(self.cfg.min_events, self.cfg.every_events):
            return False
        return len(self.window) >= self.cfg.every_events or now - (self.last_update or now) >= self.cfg.interval_s

    # ---- test ------------------------------------------------------------------------
    def models(self) -> dict[str, SeqRec]:
        return {"serving": self.serving, "candidate": self.candidate, **self.tracked}

    def score_pending(self) -> None:
        """Rank every pending target under each model (each distinct model once)."""
        if not self.pending:
            return
        ctx = [p[0] for p in self.pending]
        tgt = [p[1] for p in self.pending]
        young = np.array([p[2] for p in self.pending])
        self.pending = []
        done: dict[int, tuple] = {}
        for name, model in self.models().items():
            if id(model) not in done:
                done[id(model)] = rank_values(*rank_targets(model, ctx, tgt, self.seen_policy), self.cfg.k)
            vals = done[id(model)]
            self.metrics.setdefault(name, Rolling(self.cfg.eval_window)).add(*vals)
            if young.any():
                self.new_item_metrics.setdefault(name, Rolling(self.cfg.eval_window)).add(*(v[young] for v in vals))

    # ---- train -----------------------------------------------------------------------
    def update(self, now: float) -> dict:
        """Fine-tune a candidate from the serving model, gate it, publish it or keep it aside."""
        t0 = time.perf_counter()
        self.score_pending()
        holdout, train_seqs, fresh = self._split_window()
        new_items = [i for i, c in self.counts.most_common(MAX_NEW_ITEMS_PER_UPDATE) if c >= self.cfg.min_item_events]
        model = copy.deepcopy(self.serving)
        if new_items:
            model = grow(model, new_items, neighbours((e[0] for e in self.users.values()), set(new_items)))
        n_replay = min(len(self.replay), int(len(train_seqs) * self.cfg.replay_share))
        sample = [list(seq) for _, seq in self.rng.sample(self.replay, n_replay)]
        steps, loss = fine_tune(model, train_seqs + sample, self.cfg, self.gen, t0 + self.cfg.update_s)
        refresh_transition(model, train_seqs, fresh)
        gate = {"holdout_events": len(holdout[0])}
        if holdout[0]:
            for name, m in (("serving", self.serving), ("candidate", model)):
                hr, ndcg, _ = rank_values(*rank_targets(m, *holdout, self.seen_policy), self.cfg.k)
                gate[f"{name}_hr"], gate[f"{name}_ndcg"] = float(hr.mean()), float(ndcg.mean())
        if not holdout[0]:
            reason = "no_holdout"
        elif gate["candidate_ndcg"] > gate["serving_ndcg"] + self.cfg.margin:
            reason = None
        else:
            reason = "not_better"
        self.candidate = model.eval()
        report = {"update": self.updates + 1, "events": len(self.window), "train_sequences": len(train_seqs),
                  "replay_sequences": len(sample), "new_items": len(new_items), "vocabulary": model.cfg.n_items,
                  "steps": steps, "loss": loss, "gate": gate, "published": reason is None, "reason": reason}
        report["seconds"] = round(time.perf_counter() - t0, 3)
        if reason is None:
            report["version"] = self.publish(model, report) if self.publish else None
            self.serving = model
            self.counts = Counter({i: c for i, c in self.counts.items() if untrained(model, i)})
        self._close_window(now)
        return report

    def _split_window(self) -> tuple[tuple[list, list], list[list[RawEvent]], list[int]]:
        """(holdout contexts and targets, training histories, where each history's events of this
        window begin). The holdout is the window's most recent item events; each touched user
        trains on its history before its first held-out one."""
        item_events = [(u, n) for u, n in self.window if self._event(u, n) is not None]
        h = min(self.cfg.holdout_max, max(1, int(len(item_events) * self.cfg.holdout_share)))
        h = h if len(item_events) >= 20 else 0
        kept = {u: list(self.users[u][0]) for u in dict.fromkeys(u for u, _ in self.window) if u in self.users}
        cut: dict[str, int] = {}
        ctx, tgt = [], []
        for u, n in item_events[len(item_events) - h:] if h else []:
            pos = n - first_number(self.users[u])
            if pos:
                ctx.append(kept[u][:pos])
                tgt.append(kept[u][pos].item_id)
            cut[u] = min(cut.get(u, n), n)
        first: dict[str, int] = {}
        for u, n in self.window:
            first.setdefault(u, n)
        seqs, fresh = [], []
        for u, hist in kept.items():
            total = self.users[u][1]
            seq = hist[: cut.get(u, total + 1) - first_number(self.users[u])]
            if len(seq) >= 2:
                seqs.append(seq)
                fresh.append(max(0, first[u] - first_number(self.users[u])))
        return (ctx, tgt), seqs, fresh

    def _event(self, user: str, n: int) -> RawEvent | None:
        """The user's n-th event if still kept and it takes an item, with history before it."""
        entry = self.users.get(user)
        if entry is None:
            return None
        hist = entry[0]
        pos = n - first_number(entry)
        if pos < 1 or pos >= len(hist):
            return None
        e = hist[pos]
        return e if positive(e.item_id, e.type) else None

    def _close_window(self, now: float) -> None:
        for u in dict.fromkeys(u for u, _ in self.window):
            if u in self.users:
                self._offer_replay(u, tuple(self.users[u][0]))
        self.window = []
        self.updates += 1
        self.last_update = now


def refresh_transition(model: SeqRec, histories: list[list[RawEvent]], fresh: list[int]) -> None:
    """Add the window's transitions (those ending at or after each history's `fresh` event,
    held-out events excluded) to the candidate's transition table, so the hybrid's counts
    follow the stream and a published checkpoint carries them (docs/model.md, "Hybrid score")."""
    if not model.transition.entries or not histories:
        return  # a checkpoint without a table stays the transformer alone
    seqs = [[model.items.lookup(i) for i in item_ids(h)] for h in histories]
    starts = [len(item_ids(h[:f])) for h, f in zip(histories, fresh)]  # item events before the window
    model.transition = model.transition.merged(seqs, model.cfg.n_items + 1, TrainConfig.transition_neighbors,
                                               model.cfg.trans_window, starts)


def fine_tune(model: SeqRec, histories: list[list[RawEvent]], cfg: LearnConfig, gen: torch.Generator,
              deadline: float) -> tuple[int, float]:
    """Warm-start training on `histories` until `cfg.epochs` passes or `deadline` (perf_counter);
    the loss and optimiser are those of `streamrec train` (model/train.py). Returns (steps, mean loss)."""
    if not histories:
        return 0, float("nan")
    tc = TrainConfig(batch_size=cfg.batch_size, lr=cfg.lr)
    b_all, y_all = training_tensors(histories, model.items, tc.seq_len)
    if not int((y_all > 0).sum()):
        return 0, float("nan")
    logq = None
    if len(model.items) > FULL_SOFTMAX_MAX_ITEMS:  # uniform proposal: the window is too small for counts
        logq = torch.full((len(model.items),), -float(np.log(len(model.items))), device=model.device)
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (decay if p.dim() >= 2 and "emb" not in n else no_decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": tc.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr)
    lengths = b_all.valid.sum(1)
    model.train()
    steps, total = 0, 0.0
    for _ in range(cfg.epochs):
        for idx in length_batches(lengths, tc.batch_size, gen):
            if time.perf_counter() > deadline:
                break
            b, y = batch_rows(b_all, y_all, idx, lengths, model.device)
            h = model(b)
            m = y > 0
            if not bool(m.any()):
                continue
            loss = item_loss(model, h[m], y[m], tc, logq)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            steps += 1
            total += loss.item()
    model.eval()
    return steps, total / max(steps, 1)
