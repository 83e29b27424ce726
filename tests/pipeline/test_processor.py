"""Batch processing logic without Kafka: routing, dedupe, coalescing, the output record."""
import json
import random
from itertools import pairwise

from hypothesis import given, settings, strategies as st

from model.cooccurrence import CoOccurrence
from stream_app.config import Settings
from stream_app.pipeline.events import REASONS
from stream_app.testing.hostile import CASES
from stream_app.pipeline.processor import BatchProcessor, Message
from stream_app.serving.recommender import CoOccurrenceRecommender
from stream_app.pipeline.state import UserState

T0 = 1767225600


def msg(user, n, item=None, etype="view", key=None, ts=100.0):
    ev = {"event_id": f"e{n}", "user_id": user, "type": etype, "ts": T0 + n}
    if etype == "search":
        ev["query"] = "shoes"
    else:
        ev["item_id"] = item or f"i{n}"
    return Message(user.encode() if key is None else key, json.dumps(ev).encode(), ts)


def run(messages, store=None, **overrides):
    store = {} if store is None else store
    proc = BatchProcessor(Settings(**overrides), CoOccurrenceRecommender(), clock=lambda: 100.25)
    out = proc.process(messages, store.get)
    for user, (_, value) in out.writes.items():
        store[user] = value
    return out, store


def test_coalesces_one_write_and_one_record_per_user():
    out, store = run([msg("a", 1), msg("b", 2), msg("a", 3, etype="search"), msg("a", 4)])
    assert set(out.writes) == {"a", "b"}
    assert out.writes["a"][0] == 3  # index of a's newest event
    assert [u for u, _ in out.recommendations] == ["a", "b"]
    rec = dict(out.recommendations)["a"]
    assert rec["event_id"] == "e4" and rec["latency_ms"] == 250.0 and rec["event_ts"] == T0 + 4
    assert set(rec) >= {"user_id", "event_id", "items", "model_version", "variant", "generated_at",
                        "event_ts", "latency_ms"}
    assert UserState.from_json(store["a"]).items() == ["i1", "i4"]


def test_redelivery_changes_nothing_but_republishes_state_and_record():
    """After a SIGKILL the local store can be ahead of its changelog: the redelivery
    re-sends the same state (chaos lost 2-3 users per 10 kills without this)."""
    batch = [msg("a", 1), msg("a", 2)]
    _, store = run(batch)
    before = store["a"]
    out, store = run(batch, store)
    assert out.duplicates == 2 and out.accepted.total() == 0
    assert out.writes["a"][1] == before  # same bytes, written again for the changelog
    assert store["a"] == before
    assert [u for u, _ in out.recommendations] == ["a"]


def test_bad_and_mis_keyed_messages_are_routed():
    out, _ = run([Message(b"u", b"\xff\xfe", 1.0), msg("a", 1, key=b"other"), msg("a", 2, key=None)])
    assert [(d.index, d.reason) for d in out.dead] == [(0, "invalid_utf8")]
    assert out.rekeyed == [(1, "a")]
    assert not out.writes or "a" in out.writes


def test_history_and_dedupe_window_are_bounded():
    _, store = run([msg("a", n) for n in range(50)], history_max=10, dedupe_window=20)
    state = UserState.from_json(store["a"])
    assert len(state.history) == 10 and len(state.seen) == 20
    assert state.items()[-1] == "i49"


def test_purchased_items_are_never_recommended():
    seq = [msg("a", 1, "x"), msg("a", 2, "y"), msg("b", 3, "x"), msg("b", 4, "y", etype="purchase")]
    out, _ = run(seq)
    for user, rec in out.recommendations:
        if user == "b":
            assert "y" not in [i["item_id"] for i in rec["items"]]


def test_a_dismiss_is_stored_hides_its_item_and_teaches_the_fallback_nothing():
    seq = [msg(f"p{n}", n, "pop") for n in range(5)] + [msg("a", 10, "x"), msg("a", 11, "pop", etype="dismiss"),
                                                        msg("a", 12, "never-taken", etype="dismiss")]

    def served(**overrides):
        settings = Settings(**overrides)
        rec = CoOccurrenceRecommender(seen_policy=settings.seen_policy)
        out = BatchProcessor(settings, rec, clock=lambda: 100.25).process(seq, {}.get)
        return out, rec, [i["item_id"] for i in dict(out.recommendations)["a"]["items"]]

    out, rec, items = served()
    state = UserState.from_json(out.writes["a"][1])
    assert [e[:2] for e in state.history] == [("x", 0), ("pop", 5), ("never-taken", 5)]  # dismiss: code 5
    assert state.items() == ["x"] and state.seen_items(*Settings().seen_policy) == {"x", "pop", "never-taken"}
    assert "pop" not in items
    assert "never-taken" not in rec.model.popularity and rec.model.popularity["pop"] == 5
    assert not any("never-taken" in row or "pop" in row for row in rec.model.pairs.values())
    assert "x" not in rec.model.pairs  # nothing came after x but dismisses
    # dismiss_ttl_s=0: the dismissed item is recommendable again (the popular backfill)
    assert "pop" in served(dismiss_ttl_s=0)[2]


def test_cooccurrence_learns_what_comes_next():
    model = CoOccurrence(window=3).fit([["a", "b", "c"], ["a", "b", "d"], ["x", "b", "c"]])
    top = model.recommend(["a", "b"], k=2)
    assert top[0][0] == "c"
    assert model.recommend(["zzz"], k=1)[0][0] == "b"  # unknown item: popularity backfill
    assert "c" not in [i for i, _ in model.recommend(["b"], k=3, exclude={"c"})]


def test_cooccurrence_memory_has_a_total_budget():
    """A live stream brings new items forever: the pair table stays within its entry budget,
    evicting the least recently updated item's list, and still answers for recent items."""
    model = CoOccurrence(window=3, max_neighbors=5, max_entries=200)
    for n in range(5_000):
        model.observe([f"x{n - 2}", f"x{n - 1}"], f"x{n}")
        assert model.entries <= 200
    assert model.entries == sum(len(row) for row in model.pairs.values())
    assert "x0" not in model.pairs and model.recommend(["x4998"], k=1)[0][0] == "x4999"
    for n in range(1_000):  # unknown item ids (valid events) cannot grow popularity without bound
        model.observe([], f"new{n}")
    assert len(model.popularity) <= 200


def test_baseline_never_recommends_unavailable_items():
    import json as _json

    from stream_app.pipeline.catalog import Catalog
    from stream_app.serving.lifecycle import Lifecycle

    catalog = Catalog()
    lifecycle = Lifecycle(Settings(), catalog)  # no model: the co-occurrence baseline serves
    proc = BatchProcessor(Settings(), lifecycle.recommender, clock=lambda: 1.0)
    store: dict = {}
    for n in range(30):  # a -> x is the strongest signal
        out = proc.process([msg(f"u{n}", 2 * n, "a"), msg(f"u{n}", 2 * n + 1, "x")], store.get)
        for user, (_, value) in out.writes.items():
            store[user] = value
    first = dict(proc.process([msg("v", 1000, "a")], store.get).recommendations)["v"]
    assert first["items"][0]["item_id"] == "x"
    catalog.apply(b"x", _json.dumps({"item_id": "x", "available": False}).encode())
    again = dict(proc.process([msg("v", 1001, "a")], store.get).recommendations)["v"]
    assert "x" not in [i["item_id"] for i in again["items"]]


# --- property: any interleaving of valid, malformed, redelivered and mis-keyed messages

@st.composite
def hostile_batches(draw):
    """Messages in batches, and what each message is: ("good", user), ("bad", reason),
    ("dup", original index) or ("rekey", user)."""
    messages, kinds, good = [], [], []
    for n in range(draw(st.integers(1, 60))):
        kind = draw(st.sampled_from(["good", "good", "bad", "dup", "rekey"]))
        if kind == "dup" and good:
            original = good[draw(st.integers(0, len(good) - 1))]
            messages.append(messages[original])
            kinds.append(("dup", original))
        elif kind == "bad":
            make, reason = CASES[draw(st.integers(0, len(CASES) - 1))]
            messages.append(Message(b"bad", make(random.Random(n), n), 1.0))
            kinds.append(("bad", reason))
        else:
            user = draw(st.sampled_from(["a", "b", "c"]))
            rekey = kind == "rekey"
            messages.append(msg(user, n, key=b"elsewhere" if rekey else None))
            kinds.append(("rekey" if rekey else "good", user))
            if not rekey:
                good.append(n)
    cuts = sorted(draw(st.sets(st.integers(1, len(messages) - 1), max_size=8))) if len(messages) > 1 else []
    return messages, kinds, [0, *cuts, len(messages)]


@settings(max_examples=150, deadline=None)
@given(hostile_batches())
def test_any_interleaving_dead_letters_bad_and_applies_good_exactly_once(case):
    messages, kinds, bounds = case
    store: dict = {}
    dead, rekeyed, duplicates = [], [], 0
    for lo, hi in pairwise(bounds):
        out, store = run(messages[lo:hi], store)  # raises nothing, whatever the input
        dead += [(lo + d.index, d.reason) for d in out.dead]
        rekeyed += [lo + i for i, _ in out.rekeyed]
        duplicates += out.duplicates
    assert dead == [(i, k[1]) for i, k in enumerate(kinds) if k[0] == "bad"]  # each once, exact reason
    assert all(reason in REASONS for _, reason in dead)
    assert rekeyed == [i for i, k in enumerate(kinds) if k[0] == "rekey"]
    assert duplicates == sum(k[0] == "dup" for k in kinds)
    for user in "abc":
        want = [f"i{i}" for i, k in enumerate(kinds) if k == ("good", user)]
        state = UserState.from_json(store.get(user))
        assert state.items() == want and state.count == len(want)


# --- decoded-state cache -------------------------------------------------------------

def test_cached_states_skip_the_table_and_equal_what_was_written():
    store, loads = {}, []

    def load(user):
        loads.append(user)
        return store.get(user)

    proc = BatchProcessor(Settings(), CoOccurrenceRecommender(), clock=lambda: 100.25)
    for batch in ([msg("a", 1), msg("b", 2)], [msg("a", 3)], [msg("a", 4), msg("b", 5)]):
        out = proc.process(batch, load)
        for user, (_, value) in out.writes.items():
            store[user] = value
    assert loads == ["a", "b"]  # each user read once, then served from the cache
    assert all(proc.states.get(u).encode() == store[u] for u in ("a", "b"))
    assert UserState.from_json(store["a"]).items() == ["i1", "i3", "i4"]


def test_a_forget_drops_the_cached_state():
    store = {}
    proc = BatchProcessor(Settings(), CoOccurrenceRecommender(), clock=lambda: 100.25)
    out = proc.process([msg("a", 1)], store.get)
    store["a"] = out.writes["a"][1]
    out = proc.process([msg("a", 2, etype="forget")], store.get)
    assert out.forgets == {"a": 0} and proc.states.get("a") is None


def test_state_cache_is_bounded_lru_and_cleared_per_generation():
    from stream_app.pipeline.state import StateCache
    cache = StateCache(max_bytes=3 * 100 * StateCache.OVERHEAD)
    for user in "abc":
        cache.put(user, UserState(count=1), 100)
    cache.get("a")  # a is now the most recently used
    cache.put("d", UserState(count=2), 100)
    assert sorted(cache.entries) == ["a", "c", "d"] and cache.bytes == 3 * 100 * StateCache.OVERHEAD
    cache.put("huge", UserState(), 10**6)  # larger than the budget: not kept
    assert cache.get("huge") is None and len(cache) == 3
    cache.on_generation(7)
    assert len(cache) == 0 and cache.bytes == 0
    cache.put("a", UserState(), 10)
    cache.on_generation(7)  # the same generation keeps it
    assert cache.get("a") is not None


def test_a_hot_users_redelivery_past_the_id_window_is_still_a_no_op():
    """1,000 events of one user, then all redelivered (a SIGKILL before a commit): the
    event-id window holds 256 ids, the offset watermark catches the rest. A recreated
    topic (offsets from 0 again, newer events) is not mistaken for a redelivery."""
    def at(n, offset):
        m = msg("hot", n)
        return Message(m.key, m.value, m.timestamp, 0, offset)
    store: dict = {}
    for start in range(0, 1000, 100):
        run([at(n, n) for n in range(start, start + 100)], store)
    before = UserState.from_json(store["hot"])
    assert before.count == 1000 and before.offset == 999
    out, store = run([at(n, n) for n in range(0, 1000)], store)
    after = UserState.from_json(store["hot"])
    assert out.duplicates == 1000 and sum(out.accepted.values()) == 0 and after == before
    out, store = run([at(n, n - 1000) for n in range(1000, 1010)], store)  # offsets 0..9, newer events
    assert sum(out.accepted.values()) == 10 and UserState.from_json(store["hot"]).count == 1010


def test_a_mis_keyed_event_sent_before_a_forget_does_not_bring_the_user_back():
    """The event went to its wrong key's partition first and was re-published keyed by the
    user (with its original time) only after the user's forget was processed."""
    def forget(n, ts):
        ev = {"event_id": f"f{n}", "user_id": "a", "type": "forget", "ts": T0 + n}
        return Message(b"a", json.dumps(ev).encode(), ts, 0, n)
    def republished(n, sent_at):
        m = msg("a", n)
        return Message(m.key, m.value, sent_at + 0.5, 0, n, rekeyed_from=sent_at)
    proc = BatchProcessor(Settings(), CoOccurrenceRecommender(), clock=lambda: 100.25)
    store: dict = {}

    def feed(messages):
        out = proc.process(messages, store.get)
        for user, (_, value) in out.writes.items():
            store[user] = value
        for user in out.forgets:
            store.pop(user, None)
        return out
    feed([msg("a", 1)])
    feed([forget(2, ts=50.0)])
    out = feed([republished(3, sent_at=49.0)])  # sent before the forget: dropped
    assert out.stale_after_forget == 1 and "a" not in store
    out = feed([republished(4, sent_at=51.0)])  # sent after it: a new history begins
    assert out.stale_after_forget == 0 and UserState.from_json(store["a"]).count == 1


def test_a_re_published_event_in_the_forgets_own_batch_is_dropped_too():
    ev = {"event_id": "f1", "user_id": "a", "type": "forget", "ts": T0 + 1}
    forget = Message(b"a", json.dumps(ev).encode(), 50.0, 0, 7)
    m = msg("a", 2)
    out, store = run([msg("a", 0), forget, Message(m.key, m.value, 50.5, 0, 8, rekeyed_from=49.0)])
    assert out.stale_after_forget == 1 and "a" not in out.writes
