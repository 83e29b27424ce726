"""The trending topic's records (docs/contracts.md, "Trending snapshot"): hostile ones are
ignored with their reason and never cost a partition its snapshot, the owner answers a bad
record or a tombstone with its counts, failed publishes are retried, oversized snapshots
trimmed; and real workers (docs/design.md, "Trending is the topic's"): two worker processes
on the embedded broker answer trending alike and as an offline count of the sent events
says, also after a rebalance hands partitions over."""
from __future__ import annotations

import asyncio
import json
import logging

import pytest

from stream_app import metrics
from stream_app.pipeline.trending_topic import (MAX_SNAPSHOT_ITEMS, MAX_VALUE_BYTES, REASONS, Snapshot,
                                                encode_snapshot, parse_snapshot, publish)
from tests.pipeline.test_trending import T0, at, ev, trending


def test_failed_sends_are_published_again():
    t = trending(partitions=2)
    t.assign([0, 1])
    t.seed(t.gains)
    t.observe(ev("a"), at(0, T0)), t.observe(ev("b"), at(1, T0))
    sent = []

    async def flaky(key: bytes, value: bytes) -> None:
        if key == b"p1" and "failed once" not in sent:
            sent.append("failed once")
            raise ConnectionError("broker away")
        sent.append(key)

    assert asyncio.run(publish(t, flaky)) == 1
    assert asyncio.run(publish(t, flaky)) == 1  # p1 again; p0 unchanged, not resent
    assert sent == [b"p0", "failed once", b"p1"]
    assert asyncio.run(publish(t, flaky)) == 0


def test_a_cancelled_publish_is_published_again():
    t = trending(partitions=1)
    t.assign([0])
    t.seed(t.gains)
    t.observe(ev("a"), at(0, T0))

    async def hangs(key: bytes, value: bytes) -> None:
        await asyncio.sleep(60)

    async def revoke() -> None:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(publish(t, hangs), timeout=0.05)

    asyncio.run(revoke())
    assert [p for p, _ in t.take_snapshots()] == [0]


def test_an_oversized_snapshot_is_trimmed_to_fit():
    items = tuple((f"{n:0>128}", float(MAX_SNAPSHOT_ITEMS - n)) for n in range(MAX_SNAPSHOT_ITEMS))
    value = encode_snapshot(Snapshot(T0, items))
    assert len(value) <= MAX_VALUE_BYTES
    _, snapshot = parse_snapshot(b"p0", value, 1, T0)
    assert 0 < len(snapshot.items) < len(items) and snapshot.items == items[:len(snapshot.items)]


# --- hostile records -----------------------------------------------------------------------

def j(obj) -> bytes:
    return json.dumps(obj).encode()


GOOD = {"v": 1, "t": T0, "items": [["a", 1.0]]}
HOSTILE = [
    ("no_key", None, j(GOOD), "bad_key"),
    ("empty_key", b"", j(GOOD), "bad_key"),
    ("not_p", b"x1", j(GOOD), "bad_key"),
    ("leading_zero", b"p01", j(GOOD), "bad_key"),
    ("negative", b"p-1", j(GOOD), "bad_key"),
    ("not_utf8_key", b"p\xff", j(GOOD), "bad_key"),
    ("huge_key", b"p" + b"1" * 10_000, j(GOOD), "bad_key"),
    ("str_key", "p0", j(GOOD), "bad_key"),
    ("out_of_range", b"p4", j(GOOD), "bad_partition"),
    ("far_out_of_range", b"p999999", j(GOOD), "bad_partition"),
    ("huge_value", b"p0", j({**GOOD, "pad": "x" * MAX_VALUE_BYTES}), "too_large"),
    ("too_many_items", b"p0", j({**GOOD, "items": [["a", 1.0]] * (MAX_SNAPSHOT_ITEMS + 1)}), "too_large"),
    ("not_json", b"p0", b"{v: 1}", "invalid_json"),
    ("not_utf8", b"p0", b'{"v":1,"t":1767225600,"items":[["\xff",1]]}', "invalid_json"),
    ("nan_weight", b"p0", b'{"v":1,"t":1767225600,"items":[["a",NaN]]}', "invalid_json"),
    ("inf_weight", b"p0", b'{"v":1,"t":1767225600,"items":[["a",1e999]]}', "invalid_json"),
    ("deep", b"p0", b"[" * 600_000 + b"]" * 600_000, "too_large"),
    ("deep_under_cap", b"p0", b"[" * 5_000 + b"]" * 5_000, "invalid_json"),
    ("pickle", b"p0", b"\x80\x04K\x01.", "invalid_json"),
    ("list", b"p0", j([GOOD]), "not_object"),
    ("null", b"p0", b"null", "not_object"),
    ("no_version", b"p0", j({"t": T0, "items": []}), "unknown_version"),
    ("version_true", b"p0", j({**GOOD, "v": True}), "unknown_version"),
    ("version_2", b"p0", j({**GOOD, "v": 2}), "unknown_version"),
    ("no_time", b"p0", j({"v": 1, "items": []}), "bad_time"),
    ("time_string", b"p0", j({**GOOD, "t": "now"}), "bad_time"),
    ("time_ms", b"p0", j({**GOOD, "t": T0 * 1000}), "bad_time"),
    ("time_1970", b"p0", j({**GOOD, "t": 0}), "bad_time"),
    ("time_bool", b"p0", j({**GOOD, "t": True}), "bad_time"),
    ("items_missing", b"p0", j({"v": 1, "t": T0}), "wrong_shape"),
    ("items_dict", b"p0", j({**GOOD, "items": {"a": 1}}), "wrong_shape"),
    ("item_not_pair", b"p0", j({**GOOD, "items": [["a"]]}), "wrong_shape"),
    ("item_triple", b"p0", j({**GOOD, "items": [["a", 1, 2]]}), "wrong_shape"),
    ("item_id_number", b"p0", j({**GOOD, "items": [[1, 1.0]]}), "wrong_shape"),
    ("item_id_empty", b"p0", j({**GOOD, "items": [["", 1.0]]}), "wrong_shape"),
    ("item_id_long", b"p0", j({**GOOD, "items": [["x" * 129, 1.0]]}), "wrong_shape"),
    ("item_dict", b"p0", j({**GOOD, "items": [{"item_id": "a", "w": 1}]}), "wrong_shape"),
    ("negative_weight", b"p0", j({**GOOD, "items": [["a", -1.0]]}), "bad_weight"),
    ("huge_weight", b"p0", j({**GOOD, "items": [["a", 1e300]]}), "bad_weight"),
    ("bool_weight", b"p0", j({**GOOD, "items": [["a", True]]}), "bad_weight"),
    ("string_weight", b"p0", j({**GOOD, "items": [["a", "1"]]}), "bad_weight"),
    ("null_weight", b"p0", j({**GOOD, "items": [["a", None]]}), "bad_weight"),
]


def test_hostile_cases_cover_every_reason_but_internal():
    assert {reason for *_, reason in HOSTILE} == set(REASONS) - {"internal"}


@pytest.mark.parametrize("name,key,value,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_record_is_ignored_and_the_partition_keeps_its_snapshot(name, key, value, reason):
    t = trending(partitions=4, wall=lambda: T0)
    assert t.apply(b"p0", j(GOOD))
    before = metrics.TRENDING_REJECTED.labels(reason)._value.get()
    assert t.apply(key, value) is False
    assert metrics.TRENDING_REJECTED.labels(reason)._value.get() == before + 1
    assert t.top(5) == [("a", 1.0)]


def test_published_snapshots_validate_and_hostile_ones_do_not():
    from tests.contract_schemas import errors, record

    t = trending(partitions=1)
    t.assign([0])
    t.seed(t.gains)
    for n in range(30):
        t.observe(ev(f"i{n % 7}"), at(0, T0 + n))
    (_, value), = t.take_snapshots()
    assert not errors(record("trending-snapshot"), json.loads(value))
    schema_blind = {"bad_key", "bad_partition", "invalid_json", "too_large"}  # bytes, keys, sizes
    for name, _, value, reason in HOSTILE:
        if reason not in schema_blind and name != "time_ms":  # the reader's clock: not a schema's
            assert errors(record("trending-snapshot"), json.loads(value)), name


def test_a_snapshot_from_far_in_the_future_is_refused():
    """One record stamped years ahead would otherwise decay every other partition to nothing."""
    t = trending(partitions=2, wall=lambda: T0)
    assert t.apply(b"p0", j(GOOD))
    assert not t.apply(b"p1", j({**GOOD, "t": T0 + 86_400 * 365, "items": [["b", 1.0]]}))
    assert t.apply(b"p1", j({**GOOD, "t": T0 + 600, "items": [["b", 1.0]]}))  # within an hour: a skewed clock
    assert [i for i, _ in t.top(5)] == ["b", "a"]


def test_the_owner_republishes_over_a_bad_record_or_a_tombstone():
    """Compaction keeps a key's last record: the owner's counts must come after a bad one."""
    t = trending(partitions=2)
    t.assign([0])
    t.seed(t.gains)
    t.observe(ev("a"), at(0, T0))
    [(_, value)] = t.take_snapshots()
    for key, bad in [(b"p0", b"not json"), (b"p0", None), (b"p1", b"not json")]:
        t.apply(key, bad)
        assert t.take_snapshots() == ([(0, value)] if key == b"p0" else [])


def test_ten_thousand_hostile_records_log_one_line_per_reason(caplog):
    now = [0.0]
    t = trending(partitions=4, clock=lambda: now[0], wall=lambda: T0)
    with caplog.at_level(logging.WARNING, logger="stream_app.pipeline.trending"):
        for n in range(10_000):
            name, key, value, _ = HOSTILE[n % len(HOSTILE)]
            if name not in ("huge_value", "too_many_items", "deep"):  # the big ones once each below
                t.apply(key, value)
        for _, key, value, _ in HOSTILE:
            t.apply(key, value)
        now[0] = 61.0
        t.apply(b"p9", j(GOOD))
    reasons = [r.getMessage().split("(")[1].split(")")[0] for r in caplog.records]
    assert sorted(reasons) == sorted([*set(reasons), "bad_partition"])
    assert "more since the last such line" in caplog.records[-1].getMessage()
    assert t.apply(b"p0", j(GOOD)) and t.top(1) == [("a", 1.0)]


def test_an_internal_error_is_counted_and_contained(monkeypatch):
    import stream_app.pipeline.trending as module

    def broken(*args):
        raise KeyError("a bug")

    monkeypatch.setattr(module, "parse_snapshot", broken)
    t = trending()
    before = metrics.TRENDING_REJECTED.labels("internal")._value.get()
    assert t.apply(b"p0", j(GOOD)) is False
    assert metrics.TRENDING_REJECTED.labels("internal")._value.get() == before + 1


# --- real workers ------------------------------------------------------------------------------

HALF_LIFE_S = 3600.0
# The worker weighs each of a user's events in a micro-batch by the user's newest record time
# there; a batch spans well under 5 s, and 5 s of a 1-hour half-life is 1e-3 of a weight.
BATCH_SPAN_REL = 2e-3


def produce(settings, events: list[dict]) -> None:
    from stream_app.clients.produce import EventProducer

    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    for e in events:
        producer.send_event(e)
    producer.close()


def read_all(settings, topic: str) -> list:
    from stream_app.testing.harness import TopicReader

    reader = TopicReader(settings.bootstrap_servers, topic)
    try:
        return reader.read_to_end()
    finally:
        reader.close()


def offline(settings) -> dict[str, float]:
    """Each item's trending weight by the definition, from the events as the broker stored
    them: every accepted view, click, add_to_cart or purchase, 2^-(age / half-life) by record
    time, at the newest record time."""
    counted, seen = [], set()
    for r in read_all(settings, settings.events_topic):
        e = json.loads(r.value)
        if e["type"] in ("view", "click", "add_to_cart", "purchase") and e["event_id"] not in seen:
            seen.add(e["event_id"])
            counted.append((e["item_id"], r.timestamp / 1000))
    now = max(t for _, t in counted)
    out: dict[str, float] = {}
    for item, t in counted:
        out[item] = out.get(item, 0.0) + 2 ** (-(now - t) / HALF_LIFE_S)
    return out


def on_topic(settings) -> tuple[float, dict[str, float], set[int]]:
    """(newest t, items, partitions) of the newest valid snapshot per key, summed as the
    contract says, by this test's own arithmetic."""
    newest: dict[bytes, dict] = {}
    for r in read_all(settings, settings.trending_topic):
        try:
            value = json.loads(r.value)
        except (TypeError, ValueError):
            continue
        if isinstance(value, dict) and r.key.startswith(b"p") and int(r.key[1:]) < settings.partitions:
            newest[r.key] = value
    if not newest:
        return 0.0, {}, set()
    now = max(s["t"] for s in newest.values())
    out: dict[str, float] = {}
    for s in newest.values():
        for item, weight in s["items"]:
            out[item] = out.get(item, 0.0) + weight * 2 ** (-(now - s["t"]) / HALF_LIFE_S)
    return now, out, {int(k[1:]) for k in newest}


def close(got: dict[str, float], expected: dict[str, float]) -> bool:
    return got.keys() == expected.keys() and all(
        abs(got[i] - expected[i]) <= BATCH_SPAN_REL * expected[i] for i in expected)


def wait_for_the_topic(settings, timeout: float = 60) -> float:
    """Until the snapshots on the topic say what the events do; returns their newest t."""
    from tests.helpers import wait_until

    state = {}

    def caught_up() -> bool:
        state["now"], got, _ = on_topic(settings)
        state["got"], state["expected"] = got, offline(settings)
        return close(got, state["expected"])

    try:
        wait_until(caught_up, timeout, "the trending snapshots to count every event")
    except AssertionError:
        diff = {i: (state["got"].get(i), w) for i, w in state["expected"].items()
                if abs(state["got"].get(i, 0) - w) > BATCH_SPAN_REL * w}
        raise AssertionError(f"topic vs offline differ on {len(diff)} items, e.g. {list(diff.items())[:5]}")
    return state["now"]


def as_of(worker) -> float:
    return worker.metrics().get("streamrec_trending_as_of_timestamp_seconds", 0.0)


CATEGORIES = ("Shop > Audio > Headphones", "Shop > Audio", "Shop | Phones", "Garden")


def send_catalog(settings, rows: list[dict]) -> None:
    from stream_app.clients.produce import EventProducer

    producer = EventProducer(settings.bootstrap_servers, settings.catalog_topic)
    for r in rows:
        producer.send(None if r.get("gone") else json.dumps(r).encode(), r["item_id"].encode())
    producer.close()


def answer(worker, **params) -> list[dict]:
    """GET /surfaces/trending: its items, the answer checked against the published schema."""
    import urllib.parse

    from tests.contract_schemas import component, errors
    from tests.pipeline.test_lookup import get

    status, body = get(worker, f"/surfaces/trending?{urllib.parse.urlencode(params)}")
    assert status == 200 and not errors(component("Surface"), body), (status, body)
    assert body["kind"] == "trending" and body["model_version"] == "trending"
    return body["items"]


def agrees(items: list[dict], expected: dict[str, float], k: int) -> bool:
    """The answer is the offline ranking, to the batch-time tolerance: the right scores, in
    order, and nothing left out that weighs clearly more than the last one shown."""
    tol = 2 * BATCH_SPAN_REL
    scores = [expected.get(i["item_id"], -1.0) for i in items]
    if any(abs(i["score"] - w) > tol * w + 1e-6 for i, w in zip(items, scores)):
        return False
    if any(later > earlier * (1 + tol) for earlier, later in zip(scores, scores[1:])):
        return False
    shown = {i["item_id"] for i in items}
    floor = min(scores) * (1 + tol) if len(items) == k else 0.0
    return len(items) == min(k, len(expected)) and all(w <= floor for i, w in expected.items() if i not in shown)


@pytest.mark.integration
def test_two_workers_answer_trending_alike_across_a_rebalance(make_settings, start_worker, tmp_path):
    from model.rules import category_path, under
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.harness import metric_sum
    from stream_app.testing.synth import generate
    from stream_app.transport.broker import free_port
    from tests.helpers import wait_until

    settings = make_settings(partitions=4, trending_publish_s=1.0, trending_half_life_s=HALF_LIFE_S,
                             top_k=50)  # a surface's k is at most top_k
    events, _ = generate(users=80, items=60, events=1600, seed=27)
    rows = [{"item_id": f"i{n}", "title": f"item {n}", "category": CATEGORIES[n % 4], "price": n} for n in range(60)]
    send_catalog(settings, rows)
    a = start_worker(settings, "a")
    produce(settings, events[:800])
    wait_for_the_topic(settings)

    # b joins: a publishes the partitions it hands over; b starts their counts from them
    b = start_worker(settings.model_copy(update={"state_dir": tmp_path / "state-b", "web_port": free_port()}), "b")
    wait_until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 60, "the workers to split 4 partitions")
    produce(settings, events[800:])
    now = wait_for_the_topic(settings)
    assert on_topic(settings)[2] == {0, 1, 2, 3}
    wait_until(lambda: as_of(a) == as_of(b) == now, 30, "both workers to answer from the newest snapshots")

    expected = offline(settings)
    top = answer(a, k=20)
    assert top == answer(b, k=20) and agrees(top, expected, 20), (top, sorted(expected.items(), key=lambda e: -e[1]))
    assert {i["reason"] for i in top} == {"trending"}
    category = {r["item_id"]: r["category"] for r in rows}
    audio = {i: w for i, w in expected.items() if under(category[i], category_path("shop > audio"))}
    in_audio = answer(a, k=50, category="shop > audio")
    assert in_audio == answer(b, k=50, category="shop > audio") and agrees(in_audio, audio, 50)
    assert {i["reason"] for i in in_audio} <= {"trending:Shop > Audio > Headphones", "trending:Shop > Audio"}
    assert answer(a, k=5, category="garden", max_per_category=1, exclude=top[0]["item_id"])  # rules compose

    send_catalog(settings, [{"item_id": top[0]["item_id"], "gone": True}])  # withdrawn: never answered again
    wait_until(lambda: all(answer(w, k=19) == top[1:] for w in (a, b)), 30, "both workers to drop the withdrawn item")

    # hostile records on the topic: ignored, counted, dead-lettered; the answer stays
    producer = EventProducer(settings.bootstrap_servers, settings.trending_topic)
    producer.send(b"not json", b"p1")
    producer.send(json.dumps({"v": 1, "t": now, "items": [["evil", 1e9]]}).encode(), b"p99")
    producer.close()
    wait_until(lambda: all(metric_sum(w.metrics(), "streamrec_trending_rejected_total") >= 2 for w in (a, b)),
               30, "both workers to count the hostile records")
    dead = [r for r in read_all(settings, settings.dlq_topic) if dict(r.headers).get("streamrec-source") == b"trending"]
    assert {dict(r.headers)["streamrec-reason"] for r in dead} == {b"invalid_json", b"bad_partition"}
    assert a.alive() and b.alive() and answer(a, k=19) == answer(b, k=19) == top[1:]

    def p1_is_valid_again() -> bool:  # compaction keeps a key's last record: the owner's must be it
        last = [r for r in read_all(settings, settings.trending_topic) if r.key == b"p1"][-1]
        return last.value != b"not json"

    wait_until(p1_is_valid_again, 30, "the owner of p1 to publish over the bad record")
    assert on_topic(settings)[0] == now and close(on_topic(settings)[1], offline(settings))
