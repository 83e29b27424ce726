"""Trending without Kafka (docs/design.md, "Trending is the topic's"): the decay by record
time, bounded counts, snapshots of the owned partitions merged into one answer that two
workers give alike, gained partitions seeded from the topic, category paths, unavailable
items, and the processor's one call. The topic's records: tests/pipeline/test_trending_topic.py."""
from __future__ import annotations

import json
import math
import random
from types import SimpleNamespace

import pytest

from model.rules import Rules, violations
from stream_app.config import Settings
from stream_app.pipeline.catalog import Catalog
from stream_app.pipeline.events import TS_MAX, TS_MIN, Event
from stream_app.pipeline.processor import BatchProcessor, Message
from stream_app.pipeline.trending import COUNTED, Decayed, Trending
from stream_app.pipeline.trending_topic import Snapshot, encode_snapshot, snapshot_key
from stream_app.serving.recommender import CoOccurrenceRecommender

T0 = 1_767_225_600.0
LN2 = math.log(2)


def ev(item: str, etype: str = "view", user: str = "u") -> Event:
    return Event(f"e-{item}-{random.random()}", user, etype, T0, item)


def at(partition: int, t: float) -> SimpleNamespace:
    return SimpleNamespace(partition=partition, timestamp=t)


def trending(partitions: int = 4, half_life_s: float = 100.0, **kwargs) -> Trending:
    kwargs.setdefault("wall", lambda: T0 + 10**6)
    kwargs.setdefault("cache_s", 0.0)  # each answer sees the latest snapshots (caching has its own test)
    return Trending(partitions, half_life_s, **kwargs)


def weights(t: Trending, partition: int) -> dict[str, float]:
    """The weights a snapshot of `partition` taken now would carry."""
    return dict(t.live[partition].snapshot(t.keep, t.newest).items)


def exchange(*workers: Trending) -> None:
    """What the topic does: every worker's snapshots reach every worker, in one order."""
    records = [(snapshot_key(p), v) for w in workers for p, v in w.take_snapshots()]
    for w in workers:
        for key, value in records:
            assert w.apply(key, value)


# --- decay -----------------------------------------------------------------------------

def test_a_half_life_halves_a_weight():
    t = trending(half_life_s=100.0)
    t.assign([0])
    t.seed(t.gains)
    t.observe(ev("a"), at(0, T0))
    assert weights(t, 0) == pytest.approx({"a": 1.0})
    t.observe(ev("b"), at(0, T0 + 100))
    assert weights(t, 0) == pytest.approx({"a": 0.5, "b": 1.0}, rel=1e-9)
    t.observe(ev("b"), at(0, T0 + 300))
    assert weights(t, 0) == pytest.approx({"a": 0.125, "b": 1.25}, rel=1e-9)


def test_recent_beats_frequent_long_ago():
    counts = Decayed(LN2 / 60, 1000)
    for _ in range(3):
        counts.add("old", 0.0, T0)  # three events two half-lives before: 0.75 now
    counts.add("new", 0.0, T0 + 120)
    counts.add("tie-early", 0.0, T0 + 60)
    counts.add("tie-late", 0.0, T0 + 61)
    got = counts.snapshot(10, T0 + 120)
    assert [i for i, _ in got.items] == ["new", "old", "tie-late", "tie-early"]
    assert dict(got.items)["old"] == pytest.approx(0.75, rel=1e-9)


@pytest.mark.parametrize("half_life_s", [1.0, 3600.0])
def test_no_overflow_over_a_century(half_life_s):
    """Events from 2000 to 2100 (every time an event may carry), 100,000 on one item: no
    overflow, and the weights are still right to the precision the docstring promises."""
    counts = Decayed(LN2 / half_life_s, 1000)
    counts.add("first", 0.0, TS_MIN)
    for n in range(100_000):
        counts.add("hot", 0.0, TS_MAX - 1e-3 * n)
    counts.add("last", 0.0, TS_MAX)
    got = dict(counts.snapshot(10, TS_MAX).items)
    assert all(math.isfinite(x) for x in counts.logs.values())
    expected = sum(2 ** (-1e-3 * n / half_life_s) for n in range(100_000))
    assert got["hot"] == pytest.approx(expected, rel=1e-8)
    assert got["last"] == pytest.approx(1.0, rel=1e-8)
    assert "first" not in got  # a century of half-lives later it weighs nothing, and is left out


def test_counts_are_bounded_and_keep_the_strongest():
    t = trending(max_items=100, keep=10)
    t.assign([0])
    t.seed(t.gains)
    for _ in range(50):
        t.observe(ev("hot"), at(0, T0))
    sizes = []
    for n in range(1000):
        t.observe(ev(f"i{n}"), at(0, T0 + n / 1000))
        sizes.append(len(t.live[0]))
    assert max(sizes) <= 100 and min(sizes[100:]) >= 50
    top = t.live[0].snapshot(10, t.newest).items
    assert top[0][0] == "hot" and [i for i, _ in top[1:4]] == ["i999", "i998", "i997"]
    ties = Decayed(LN2, 100)  # all equal: the pruning must still halve
    for n in range(1000):
        ties.add(f"i{n}", 0.0, T0)
        assert len(ties) <= 100


def test_only_item_events_count():
    t = trending()
    t.assign([0])
    for etype in ("search", "forget", "dismiss", "like"):
        t.observe(Event("x", "u", etype, T0, "a"), at(0, T0))
    t.observe(Event("x", "u", "view", T0, None), at(0, T0))  # no item
    t.observe(ev("a"), at(-1, T0))  # no partition
    t.observe(ev("a"), at(9, T0))  # not an input partition
    assert len(t.live[0]) == 0 and set(COUNTED) == {"view", "click", "add_to_cart", "purchase"}
    for etype in COUNTED:
        t.observe(ev("a", etype), at(0, T0))
    assert weights(t, 0)["a"] == pytest.approx(4.0)


def test_a_record_time_from_the_future_counts_as_now():
    t = trending(wall=lambda: T0)
    t.assign([0])
    t.seed(t.gains)
    t.observe(ev("a"), at(0, T0 + 10**8))  # a producer's clock years ahead
    assert t.newest == T0 + 300  # FUTURE_SKEW_S, as the stream clock caps it


# --- merge ----------------------------------------------------------------------------

def offline(events: list[tuple[str, float]], half_life_s: float) -> dict[str, float]:
    """(item, record time) -> each item's weight at the newest time, by the definition."""
    now = max(t for _, t in events)
    out: dict[str, float] = {}
    for item, t in events:
        out[item] = out.get(item, 0.0) + 2 ** (-(now - t) / half_life_s)
    return out


def test_two_workers_give_the_same_answer_as_an_offline_count():
    rng = random.Random(3)
    a, b = trending(partitions=4), trending(partitions=4)
    a.assign([0, 1]), b.assign([2, 3])
    exchange(a, b)  # nothing to publish yet: both seeded from an empty topic
    for w in (a, b):
        w.seed(w.gains)
    sent = []
    for n in range(2000):
        item, partition, t = f"i{int(rng.paretovariate(1.2)) % 40}", rng.randrange(4), T0 + n * 0.5
        (a if partition < 2 else b).observe(ev(item), at(partition, t))
        sent.append((item, t))
    assert a.top(10) == b.top(10) == []  # live counts answer nothing until published
    exchange(a, b)
    assert a.top(40) == b.top(40)  # identical, floats included
    expected = offline(sent, 100.0)
    got = dict(a.top(40))
    assert got == pytest.approx(expected, rel=1e-9)
    ranked = sorted(expected, key=lambda i: (-expected[i], i))
    assert [i for i, _ in a.top(10)] == ranked[:10]
    assert a.as_of == b.as_of == max(t for _, t in sent)


def test_snapshots_are_decayed_to_the_newest_one():
    t = trending(partitions=2)
    t.apply(b"p0", encode_snapshot(Snapshot(T0, (("a", 4.0),))))
    t.apply(b"p1", encode_snapshot(Snapshot(T0 + 200, (("a", 1.0), ("b", 1.5)))))
    assert t.top(5) == [("a", pytest.approx(2.0)), ("b", pytest.approx(1.5))]
    assert t.as_of == T0 + 200
    t.apply(b"p1", None)  # a tombstone clears the partition
    assert t.top(5) == [("a", 4.0)] and t.as_of == T0


def test_a_gained_partition_starts_from_its_newest_snapshot():
    old, new = trending(partitions=2), trending(partitions=2)
    old.assign([0, 1]), new.assign([])
    old.seed(old.gains)
    old.observe(ev("a"), at(1, T0))
    old.observe(ev("a"), at(1, T0))
    exchange(old, new)
    old.observe(ev("b"), at(1, T0 + 1))  # counted by old after its last publish ...
    exchange(old, new)  # ... and published at revocation
    old.assign([0]), new.assign([1])  # the rebalance
    assert 1 not in old.live and 1 in old.snapshots
    new.observe(ev("c"), at(1, T0 + 2))  # an event before the topic was read that far
    assert new.take_snapshots() == []  # not published unseeded: it would erase the others
    assert new.seed(new.gains) == [1]
    got = dict(new.live[1].snapshot(10, T0 + 2).items)
    assert got == pytest.approx({"a": 2 * 2 ** -0.02, "b": 2 ** -0.01, "c": 1.0})
    exchange(old, new)
    assert old.top(3) == new.top(3) and [i for i, _ in new.top(3)] == ["a", "c", "b"]


def test_the_ranking_is_cached_briefly():
    now = [0.0]
    t = trending(partitions=2, clock=lambda: now[0], cache_s=1.0)
    t.apply(b"p0", encode_snapshot(Snapshot(T0, (("a", 1.0),))))
    assert t.top(5) == [("a", 1.0)]
    t.apply(b"p1", encode_snapshot(Snapshot(T0, (("b", 2.0),))))
    assert t.top(5) == [("a", 1.0)]  # within cache_s
    now[0] = 1.5
    assert t.top(5) == [("b", 2.0), ("a", 1.0)]


# --- category and availability ------------------------------------------------------------

def catalog_with(rows: dict[str, dict]) -> Catalog:
    catalog = Catalog()
    for item_id, row in rows.items():
        assert catalog.apply(item_id.encode(), json.dumps({"item_id": item_id, **row}).encode())
    return catalog


def test_categories_rules_and_unavailable_items():
    catalog = catalog_with({"cream": {"category": "Beauty > Skin Care", "price": 12},
                            "soap": {"category": "Beauty > Skin Care > Cleansers", "price": 4},
                            "lipstick": {"category": "Beauty|Makeup", "price": 20},
                            "ball": {"category": "Sports"}, "gone": {"category": "Beauty", "available": False}})
    t = trending(partitions=1, catalog=catalog)
    ranked = [("gone", 9.0), ("ball", 8.0), ("soap", 7.0), ("unknown", 6.5), ("lipstick", 6.0), ("cream", 5.0)]
    t.apply(b"p0", encode_snapshot(Snapshot(T0, tuple(ranked))))
    assert [i for i, _ in t.top(10)] == ["ball", "soap", "unknown", "lipstick", "cream"]
    assert [i for i, _ in t.top(2)] == ["ball", "soap"]
    assert [i for i, _ in t.top(10, "beauty")] == ["soap", "lipstick", "cream"]
    assert t.top(10, "Skin Care") == [] and t.top(10, "Garden") == []
    answer = t.ranked(10, Rules(categories=("Beauty / Skin Care",)))
    assert answer.items == [("soap", 7.0), ("cream", 5.0)] and answer.model_version == "trending"
    assert answer.reasons == ["trending:Beauty > Skin Care > Cleansers", "trending:Beauty > Skin Care"]
    assert t.ranked(2).reasons == ["trending", "trending"] and t.ranked(2, reasons=False).reasons is None
    cheap = t.ranked(10, Rules(price_max=15, max_per_category=1))
    assert [i for i, _ in cheap.items] == ["soap", "cream"]  # priced, and one per category
    not_beauty = t.ranked(10, Rules(exclude_categories=("beauty",), exclude=frozenset({"ball"})))
    assert [i for i, _ in not_beauty.items] == ["unknown"]
    assert catalog.apply(b"soap", None)  # withdrawn while the answers are cached
    assert "soap" not in dict(t.top(10)) and "soap" not in dict(t.top(10, "Beauty"))
    assert all(not violations([i for i, _ in t.ranked(10, r).items], r, catalog.meta)
               for r in (Rules(categories=("beauty",)), Rules(price_max=15, max_per_category=1)))


def test_a_surface_answers_with_its_rules_and_the_request_s():
    from stream_app.serving.lookup import Query
    from stream_app.serving.surfaces import Surface

    catalog = catalog_with({"cream": {"category": "Beauty", "price": 12}, "serum": {"category": "Beauty", "price": 40},
                            "ball": {"category": "Sports", "price": 9}})
    t = trending(partitions=1, catalog=catalog, reasons=False)
    t.apply(b"p0", encode_snapshot(Snapshot(T0, (("serum", 3.0), ("ball", 2.0), ("cream", 1.0)))))
    deals = Surface("deals", "trending", 10, Rules(price_max=15))
    assert t.answer(deals, Query(k=10)).items == [("ball", 2.0), ("cream", 1.0)]
    got = t.answer(deals, Query(k=10, rules=Rules(categories=("beauty",))))
    assert got.items == [("cream", 1.0)] and got.reasons is None


def test_a_small_category_is_found_far_down_the_ranking():
    """Not only among the best `rules_pool` items: trending in a category means in it."""
    catalog = catalog_with({"seeds": {"category": "Garden"}})
    t = trending(partitions=1, catalog=catalog)
    top = tuple((f"i{n}", 10_000.0 - n) for n in range(5000)) + (("seeds", 0.5),)
    t.apply(b"p0", encode_snapshot(Snapshot(T0, top)))
    assert t.top(5, "garden") == [("seeds", 0.5)]


# --- the processor's one call ---------------------------------------------------------------

def test_the_processor_counts_accepted_events_once():
    settings = Settings(partitions=2)
    t = Trending.of(settings)
    proc = BatchProcessor(settings, CoOccurrenceRecommender(), trending=t)
    t.assign([0])
    t.seed(t.gains)

    def m(n: int, item: str, etype: str = "view") -> Message:
        body = {"event_id": f"e{n}", "user_id": "u1", "type": etype, "ts": T0, "item_id": item}
        if etype == "search":
            body = {**body, "query": "q"}
            del body["item_id"]
        return Message(b"u1", json.dumps(body).encode(), T0 + n, partition=0, offset=n)

    store: dict = {}
    batch = [m(0, "a"), m(1, "a"), m(2, "b", "purchase"), m(3, "", "search")]
    out = proc.process(batch, store.get)
    store.update({u: v for u, (_, v) in out.writes.items()})
    proc.process([m(0, "a"), m(1, "a")], store.get)  # redelivered: duplicates, not counted again
    assert weights(t, 0) == pytest.approx({"a": 2.0, "b": 1.0}, rel=1e-3)
    assert Settings().trending_max_items >= 2 * Settings().trending_keep
    with pytest.raises(ValueError, match="STREAMREC_TRENDING_MAX_ITEMS"):
        Settings(trending_keep=1000, trending_max_items=1500)
