"""Trending items: recency-weighted popularity over all input partitions, answered the
same by every worker (docs/design.md, "Trending is the topic's").

A worker sees only the events of the input partitions it owns, so it keeps *live counts*
for those alone: per item, the sum of its accepted item events (COUNTED), each decayed by
its record time with half-life `trending_half_life_s`. Every `trending_publish_s` it
publishes each changed partition's strongest `trending_keep` items as a *snapshot* to the
compacted trending topic, keyed `p<partition>`; every worker reads that topic from the
beginning without a group (stream_app/pipeline/trending_topic.py, which also holds the
record's codec) and keeps the newest snapshot per partition. The answer is computed from
those snapshots alone, the worker's own partitions' included: it is then a function of what
the topic carries, so two workers that have read the same records give the same answer, to
the last bit, under traffic too.
Mixing in live counts would make a worker's own partitions fresher than its peers' view of
them, and two workers would disagree for as long as events flow. The price is freshness:
an event counts once its partition's next snapshot is read back (one publish interval).

Counts live in the log domain: an item holds L = ln Σ w·e^(λ(t - ref)) over its events
(λ = ln 2 / half-life, `ref` a reference time of its partition), its weight at time `now` is
e^(L - λ(now - ref)), adding an event is a log-add-exp, and the order of items never
changes as time passes, so adding and pruning need no clock. Nothing overflows over any span
an event's time may have: when a new event would lie e^64 above the reference, the reference
moves to it and every value shifts down by the same amount (a pass over the partition's
items, once every ~92 half-lives of stream time). A fixed reference such as the epoch would
also never overflow, but λ·t near 3e9 (a one-second half-life) leaves a double ~1e-6 of
relative precision per event, which a hot item's hundred thousand events add up to 1e-4.
"""
from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from dataclasses import dataclass, field
from operator import itemgetter
from typing import TYPE_CHECKING, Any, Callable, Iterable

from model.rules import EMPTY, NO_META, Rules, apply as apply_rules
from stream_app import metrics
from stream_app.config import Settings
from stream_app.pipeline.catalog import Throttle
from stream_app.pipeline.events import Event
from stream_app.pipeline.state import FUTURE_SKEW_S
from stream_app.pipeline.trending_topic import Rejected, Snapshot, encode_snapshot, parse_snapshot
from stream_app.serving.recommender import Ranked

if TYPE_CHECKING:
    from stream_app.serving.lookup import Query
    from stream_app.serving.surfaces import Surface

log = logging.getLogger(__name__)

# Event types that make an item trend, and their weights: an explicit allow-list, so search,
# forget and any type added later count only once someone decides they should. Equal
# weights: a view is far more frequent than a purchase, and weighting purchases up would let
# a few buyers outrank what many people look at, which is what "trending" means here.
COUNTED = {"view": 1.0, "click": 1.0, "add_to_cart": 1.0, "purchase": 1.0}
_LOG_WEIGHT = {etype: math.log(w) for etype, w in COUNTED.items()}

for _k in ("live", "snapshot"):
    metrics.TRENDING_ITEMS.labels(_k)


def logaddexp(a: float, b: float) -> float:
    if a < b:
        a, b = b, a
    return a + math.log1p(math.exp(b - a))


class Decayed:
    """One owned partition's live counts (module docstring: the log domain, moving reference).

    Bounded: past `max_items` items the weakest half is dropped. An item dropped is one that
    is far from the top, and comes back on its next event, as a newcomer would."""

    __slots__ = ("rate", "max_items", "logs", "ref", "dirty")
    REBASE = 64.0  # a new event this far above the reference (e^64) moves it: ~92 half-lives

    def __init__(self, rate: float, max_items: int) -> None:
        self.rate, self.max_items = rate, max_items
        self.logs: dict[str, float] = {}  # item -> ln Σ w·e^(λ(t - ref))
        self.ref: float | None = None
        self.dirty = False  # changed since the last snapshot was taken

    def add(self, item_id: str, log_weight: float, t: float) -> None:
        if self.ref is None:
            self.ref = t
        x = log_weight + self.rate * (t - self.ref)
        if x > self.REBASE:
            self._rebase(t)
            x = log_weight
        old = self.logs.get(item_id)
        self.logs[item_id] = x if old is None else logaddexp(old, x)
        self.dirty = True
        if len(self.logs) > self.max_items:
            self._prune(self.max_items // 2)

    def _prune(self, keep: int) -> None:
        """Keep the `keep` strongest: a sort of the values and one pass (5x faster than a
        heap of `keep` entries: ~35 ms at 100,000 items, in the event loop)."""
        cut = sorted(self.logs.values(), reverse=True)[keep - 1]
        kept = {item_id: x for item_id, x in self.logs.items() if x > cut}
        for item_id, x in self.logs.items():  # ties at the cut, until `keep`
            if len(kept) >= keep:
                break
            if x == cut:
                kept[item_id] = x
        self.logs = kept

    def _rebase(self, t: float) -> None:
        """Move the reference to `t`: every value shifts by the same amount, the order stays."""
        shift = self.rate * (t - self.ref)
        self.logs = {item_id: x - shift for item_id, x in self.logs.items()}
        self.ref = t

    def add_snapshot(self, snapshot: Snapshot) -> None:
        """Seed from a snapshot: its weights are at its own time `t`."""
        for item_id, weight in snapshot.items:
            if weight > 0:
                self.add(item_id, math.log(weight), snapshot.t)

    def snapshot(self, n: int, t: float) -> Snapshot:
        """The `n` strongest items weighted at `t`; those decayed to 0 are left out."""
        top = heapq.nlargest(n, self.logs.items(), key=itemgetter(1))
        offset = self.rate * (t - self.ref) if self.ref is not None else 0.0
        items = ((item_id, math.exp(min(700.0, x - offset))) for item_id, x in top)
        return Snapshot(t, tuple((i, w) for i, w in items if w > 0))

    def __len__(self) -> int:
        return len(self.logs)


@dataclass(slots=True)
class Ranking:
    """The merged answer over all snapshots at one version, best first."""

    version: int
    computed_at: float  # the monotonic clock
    now: float | None  # stream time the scores are decayed to: the newest snapshot's
    items: list[tuple[str, float]]
    # rules -> (when, the items their filters allow): kept `cache_s` at most, as the catalog
    # may move an item to another category or change its price
    pools: dict[Rules, tuple[float, list[tuple[str, float]]]] = field(default_factory=dict)


class Trending:
    """Live counts of the owned partitions, the newest snapshot of every partition, and
    the answer. Mutated only in the event loop."""

    MAX_CACHED_POOLS = 64
    MAX_POOL = 10_000  # candidates a request's rules pick from: every item trending, up to this
    VERSION = "trending"  # the answer's model_version: counts, not a model

    def __init__(self, partitions: int, half_life_s: float = 3600.0, max_items: int = 100_000,
                 keep: int = 1_000, catalog: Any = None, cache_s: float = 1.0, reasons: bool = True,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time,
                 log_interval_s: float = 60.0) -> None:
        self.partitions, self.rate, self.max_items, self.keep = partitions, math.log(2) / half_life_s, max_items, keep
        self.catalog, self.cache_s, self.clock, self.wall = catalog, cache_s, clock, wall
        self.reasons = reasons  # a reason per answered item (the `reasons` setting)
        self.live: dict[int, Decayed] = {}
        # gained partitions not yet seeded -> the gain they came with: their live counts hold
        # only what arrived since, and are not published until the topic was read that far
        self.seeding: dict[int, int] = {}
        self.gains = 0
        self.snapshots: dict[int, Snapshot] = {}
        self.newest: float | None = None  # the stream clock: newest record time counted or seeded
        self._version = 0
        self._ranking: Ranking | None = None
        self._throttle = Throttle(log_interval_s, clock, log)
        self.last_reason: str | None = None  # why the last apply() returned False (None: applied)
        self.last_detail: str | None = None
        self.loaded = asyncio.Event()  # the topic was read to the end it had at start

    @classmethod
    def of(cls, settings: Settings, catalog: Any = None) -> "Trending":
        return cls(settings.partitions, settings.trending_half_life_s, settings.trending_max_items,
                   settings.trending_keep, catalog, reasons=settings.reasons)

    # --- live counts (owned partitions) ------------------------------------------------------

    def observe(self, event: Event, message: Any) -> None:
        """One accepted event; `message` is its Kafka record (`partition`, `timestamp`).
        Decayed by record time, capped FUTURE_SKEW_S past this worker's clock as the
        stream clock is (docs/design.md, "Idle by the stream's clock")."""
        log_weight = _LOG_WEIGHT.get(event.type)
        partition = message.partition
        if log_weight is None or event.item_id is None or not 0 <= partition < self.partitions:
            return
        counts = self.live.get(partition)
        if counts is None:  # an event before its partition's assignment reached us
            self._gain([partition])
            counts = self.live[partition]
        t = min(message.timestamp, self.wall() + FUTURE_SKEW_S)
        counts.add(event.item_id, log_weight, t)
        if self.newest is None or t > self.newest:
            self.newest = t

    def assign(self, partitions: Iterable[int]) -> set[int]:
        """The worker owns `partitions` now: the live counts of lost ones are dropped (their
        snapshots stay and answer for them); gained ones start empty and wait for `seed`."""
        partitions = {p for p in partitions if 0 <= p < self.partitions}
        for lost in set(self.live) - partitions:
            del self.live[lost]
            self.seeding.pop(lost, None)
        gained = partitions - set(self.live)
        self._gain(gained)
        return gained

    def _gain(self, partitions: Iterable[int]) -> None:
        partitions = list(partitions)
        if partitions:
            self.gains += 1
        for p in partitions:
            self.live[p] = Decayed(self.rate, self.max_items)
            self.seeding[p] = self.gains

    def seed(self, upto: int) -> list[int]:
        """The topic was read to the end offsets it had after gain `upto`, so the newest
        snapshot of each partition gained by then is the last its previous owner published:
        add it to what arrived since. Returns the partitions seeded."""
        seeded = [p for p, gain in self.seeding.items() if gain <= upto]
        for p in seeded:
            del self.seeding[p]
            snapshot = self.snapshots.get(p)
            if snapshot is not None:
                self.live[p].add_snapshot(snapshot)
                if self.newest is None or snapshot.t > self.newest:
                    self.newest = snapshot.t
        return seeded

    def due(self, partitions: Iterable[int] | None = None) -> list[int]:
        """The seeded partitions changed since their last snapshot (of `partitions`, if given)."""
        wanted = set(self.live) if partitions is None else set(partitions) & set(self.live)
        if self.newest is None:
            return []
        return [p for p in sorted(wanted) if self.live[p].dirty and p not in self.seeding]

    def take(self, partition: int) -> bytes:
        """The partition's snapshot at the stream clock (~10 ms at 100,000 items); it counts
        as clean from now."""
        counts = self.live[partition]
        counts.dirty = False
        return encode_snapshot(counts.snapshot(self.keep, self.newest))

    def take_snapshots(self, partitions: Iterable[int] | None = None) -> list[tuple[int, bytes]]:
        """(partition, value) of every partition `due`."""
        return [(p, self.take(p)) for p in self.due(partitions)]

    def unsent(self, partitions: Iterable[int]) -> None:
        """Their snapshots were not sent: take them again next time."""
        for p in partitions:
            if p in self.live:
                self.live[p].dirty = True

    # --- the topic ---------------------------------------------------------------------------

    def apply(self, key: Any, value: Any) -> bool:
        """One trending-topic record; True if applied. Never raises for a record: a bad one
        is counted, logged (throttled) and ignored, and its partition keeps the snapshot it
        had. MemoryError propagates."""
        self.last_reason = self.last_detail = None
        try:
            partition, snapshot = parse_snapshot(key, value, self.partitions, self.wall())
        except Rejected as exc:
            self._owner_answers(exc.partition)
            return self._reject(exc.reason, exc.detail)
        except MemoryError:
            raise
        except Exception as exc:  # one record must not take the follower (and the worker) down
            return self._reject("internal", f"{type(exc).__name__}: {exc}", exc)
        if snapshot is None:
            self.snapshots.pop(partition, None)
            self._owner_answers(partition)
        else:
            self.snapshots[partition] = snapshot
        self._version += 1
        metrics.TRENDING_SNAPSHOTS.labels("applied").inc()
        return True

    def _owner_answers(self, partition: int | None) -> None:
        """A tombstone or a refused record keyed by a partition this worker owns: publish its
        counts again, so compaction keeps them rather than what came last."""
        if partition in self.live:
            self.live[partition].dirty = True

    def _reject(self, reason: str, detail: str, exc: BaseException | None = None) -> bool:
        self.last_reason, self.last_detail = reason, detail
        metrics.TRENDING_REJECTED.labels(reason).inc()
        self._throttle.warn(reason, f"trending record ignored ({reason}): {detail}", exc)
        return False

    def export(self) -> None:
        metrics.TRENDING_ITEMS.labels("live").set(sum(map(len, self.live.values())))
        metrics.TRENDING_ITEMS.labels("snapshot").set(sum(len(s.items) for s in self.snapshots.values()))
        metrics.TRENDING_AS_OF.set(self.as_of or 0.0)

    # --- the answer --------------------------------------------------------------------------

    def ranking(self) -> Ranking:
        """Every snapshot decayed to the newest one's time and summed per item, best first
        (ties by item id). Partitions are summed in order, so the floats are the same on
        every worker. Recomputed at most every `cache_s` while snapshots keep arriving."""
        cached = self._ranking
        if cached is not None and (cached.version == self._version or self.clock() - cached.computed_at < self.cache_s):
            return cached
        now = max((s.t for s in self.snapshots.values()), default=None)
        totals: dict[str, float] = {}
        for p in sorted(self.snapshots):
            snapshot = self.snapshots[p]
            factor = math.exp(-self.rate * (now - snapshot.t))
            for item_id, weight in snapshot.items:
                totals[item_id] = totals.get(item_id, 0.0) + weight * factor
        items = sorted(((i, s) for i, s in totals.items() if s > 0), key=lambda e: (-e[1], e[0]))
        self._ranking = Ranking(self._version, self.clock(), now, items)
        return self._ranking

    def ranked(self, k: int, rules: Rules = EMPTY, reasons: bool = True) -> Ranked:
        """The `k` items trending now, best first, that `rules` allow (model/rules.py: a
        category rule keeps that category and those under it), never an unavailable one.
        The candidates are every item trending (up to MAX_POOL), not the best `rules_pool`:
        trending in a small category must find it however far down the whole ranking it is.
        A reason per item: `trending`, or `trending:<its category>` when categories were
        asked for (which one made it trend)."""
        ranking = self.ranking()
        unavailable = self.catalog.unavailable if self.catalog is not None else frozenset()
        meta = self.catalog.meta if self.catalog is not None else {}
        if rules.empty:
            items = []
            for item_id, score in ranking.items:
                if len(items) >= k:
                    break
                if item_id not in unavailable:
                    items.append((item_id, score))
        else:
            pool = [e for e in self._pool(ranking, rules, meta) if e[0] not in unavailable]
            items = apply_rules(pool, rules, meta, k)
        why = None
        if reasons:
            asked = bool(rules.categories or rules.also)
            why = [f"trending:{c}" if asked and (c := (meta.get(i) or NO_META).get("category")) else "trending"
                   for i, _ in items]
        return Ranked(items, self.VERSION, "default", why)

    def answer(self, surface: "Surface", query: "Query", category: str | None = None) -> Ranked:
        """The trending kind of `GET /surfaces/{name}` (stream_app/pipeline/pages.py): the
        surface's rules and the request's (a requested category is among the latter)."""
        return self.ranked(query.k, surface.rules & query.rules, self.reasons)

    def top(self, n: int, category: str | None = None) -> list[tuple[str, float]]:
        """(item_id, score) of the `n` items trending now (of `category` and under it): score
        = the item's events, each weighted 2^-(age / half-life), age back from `as_of`."""
        return self.ranked(n, Rules(categories=(category,)) if category else EMPTY, reasons=False).items

    @property
    def as_of(self) -> float | None:
        """The stream time the scores are decayed to (None: no snapshot read yet)."""
        return self.ranking().now

    def _pool(self, ranking: Ranking, rules: Rules, meta: Any) -> list[tuple[str, float]]:
        """The ranking's items the rules' filters allow, best first: one scan, kept `cache_s`
        (at most MAX_CACHED_POOLS sets of rules)."""
        now = self.clock()
        cached = ranking.pools.get(rules)
        if cached is not None and now - cached[0] < self.cache_s:
            return cached[1]
        pool = []
        for item_id, score in ranking.items:
            if rules.allows(item_id, meta.get(item_id) or NO_META):
                pool.append((item_id, score))
                if len(pool) >= self.MAX_POOL:
                    break
        if rules in ranking.pools or len(ranking.pools) < self.MAX_CACHED_POOLS:
            ranking.pools[rules] = (now, pool)
        return pool
