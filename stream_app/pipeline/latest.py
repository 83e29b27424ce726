"""The latest recommendation per user, held by the worker that owns the user.

It serves `GET /recommendations/{user_id}` and measures online quality: a click,
add-to-cart or purchase of an item that was in the user's latest recommendations is a
hit for the variant that produced them. Bounded (LRU): it is a cache of what was
published, not state; after a restart it refills as users act.
"""
from __future__ import annotations

from collections import OrderedDict, defaultdict, deque

from stream_app import metrics
from stream_app.pipeline.events import Event

ENGAGEMENT = frozenset({"click", "add_to_cart", "purchase"})


class LatestStore:
    def __init__(self, capacity: int = 200_000, window: int = 1000) -> None:
        self.capacity = capacity
        self._records: OrderedDict[str, dict] = OrderedDict()
        self._items: dict[str, frozenset[str]] = {}
        self._recent: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=window))

    def get(self, user_id: str) -> dict | None:
        return self._records.get(user_id)

    def put(self, user_id: str, record: dict) -> None:
        self._records[user_id] = record
        self._records.move_to_end(user_id)
        self._items[user_id] = frozenset(i["item_id"] for i in record["items"])
        while len(self._records) > self.capacity:
            old, _ = self._records.popitem(last=False)
            self._items.pop(old, None)

    def forget(self, user_id: str) -> None:
        self._records.pop(user_id, None)
        self._items.pop(user_id, None)

    def score(self, event: Event) -> None:
        """Count an engagement against the recommendations the user had *before* it."""
        if event.type not in ENGAGEMENT or event.user_id not in self._records:
            return
        variant = self._records[event.user_id]["variant"]
        hit = int(event.item_id in self._items[event.user_id])
        metrics.ONLINE_OPPORTUNITIES.labels(variant).inc()
        if hit:
            metrics.ONLINE_HITS.labels(variant).inc()
        recent = self._recent[variant]
        recent.append(hit)
        metrics.ONLINE_HIT_RATE.labels(variant).set(sum(recent) / len(recent))

    def __len__(self) -> int:
        return len(self._records)
