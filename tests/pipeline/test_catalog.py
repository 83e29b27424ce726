"""The catalog contract (docs/contracts.md, "Catalog item"): every hostile record is
rejected with its reason and withdraws its item, nothing raises out of Catalog.apply, and a
real worker survives a compacted topic full of them, before and after a restart."""
from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from types import SimpleNamespace

import pytest

from stream_app import metrics
from stream_app.pipeline.catalog import MAX_KEY_BYTES, MAX_VALUE_BYTES, REASONS, Catalog, apply_all


def j(obj) -> bytes:
    return json.dumps(obj).encode()


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


DEEP_OBJECT = b'{"a":' * 5_000 + b"1" + b"}" * 5_000

# (name, key, value, reason): each hostile record with the one reason it must get
HOSTILE = [
    ("deep_list_5000", b"k", nested(5_000), "invalid_json"),
    ("deep_object_5000", b"k", DEEP_OBJECT, "invalid_json"),
    ("deep_title_5000", b"k", b'{"item_id":"k","title":' + nested(5_000) + b"}", "invalid_json"),
    ("deep_unclosed", b"k", b"[" * 60_000, "invalid_json"),
    ("deep_100000_over_cap", b"k", nested(100_000), "too_large"),
    ("key_encoded_surrogate", b"\xed\xa0\x80", j({"title": "x"}), "invalid_utf8"),
    ("key_not_utf8", b"\xff\xfe", j({"title": "x"}), "invalid_utf8"),
    ("item_id_lone_surrogate", b"k", b'{"item_id":"\\ud800"}', "invalid_utf8"),
    ("category_lone_surrogate", b"k", b'{"item_id":"k","category":"\\udc00"}', "invalid_utf8"),
    ("title_lone_surrogate", b"k", b'{"item_id":"k","title":"mouse \\ud800"}', "invalid_utf8"),
    ("title_raw_surrogate_bytes", b"k", b'{"title":"\xed\xa0\x80"}', "invalid_utf8"),
    ("value_not_utf8", b"k", b'{"title":"\xff"}', "invalid_utf8"),
    ("pickle", b"k", b"\x80\x04K\x01.", "invalid_utf8"),
    ("not_json", b"k", b"{title: mouse}", "invalid_json"),
    ("truncated_json", b"k", b'{"item_id":"k"', "invalid_json"),
    ("list", b"k", j(["k"]), "not_object"),
    ("number", b"k", b"42", "not_object"),
    ("string", b"k", j("k"), "not_object"),
    ("json_null", b"k", b"null", "not_object"),
    ("json_true", b"k", b"true", "not_object"),
    ("huge_value", b"k", j({"title": "x" * MAX_VALUE_BYTES}), "too_large"),
    ("huge_key", b"k" * (MAX_KEY_BYTES + 1), j({"title": "x"}), "too_large"),
    ("long_item_id", b"k" * 129, j({"title": "x"}), "field_too_long"),
    ("long_title", b"k", j({"title": "x" * 1025}), "field_too_long"),
    ("long_category", b"k", j({"category": "c" * 257}), "field_too_long"),
    ("no_key", None, j({"item_id": "k"}), "missing_field"),
    ("empty_key", b"", j({"item_id": "k"}), "missing_field"),
    ("blank_key", b"   ", j({"title": "x"}), "empty_field"),
    ("blank_item_id", b"k", j({"item_id": " "}), "empty_field"),
    ("key_mismatch", b"k", j({"item_id": "other"}), "key_mismatch"),
    ("item_id_number", b"k", j({"item_id": 7}), "wrong_type"),
    ("title_number", b"k", j({"title": 5}), "wrong_type"),
    ("title_zero", b"k", j({"title": 0}), "wrong_type"),
    ("title_list", b"k", j({"title": ["a"]}), "wrong_type"),
    ("category_object", b"k", j({"category": {"a": 1}}), "wrong_type"),
    ("price_nan", b"k", b'{"price": NaN}', "invalid_json"),
    ("price_infinity", b"k", b'{"price": Infinity}', "invalid_json"),
    ("price_overflow", b"k", b'{"price": 1e999}', "invalid_json"),
    ("price_string", b"k", j({"price": "19.9"}), "bad_price"),
    ("price_bool", b"k", j({"price": True}), "bad_price"),
    ("price_list", b"k", j({"price": [1]}), "bad_price"),
    ("available_string_false", b"k", j({"available": "false"}), "bad_available"),
    ("available_string_true", b"k", j({"available": "true"}), "bad_available"),
    ("available_zero", b"k", j({"available": 0}), "bad_available"),
    ("available_one", b"k", j({"available": 1}), "bad_available"),
    ("available_null", b"k", j({"available": None}), "bad_available"),
    ("available_list", b"k", j({"available": []}), "bad_available"),
    ("attributes_list", b"k", j({"attributes": ["brand"]}), "bad_attributes"),
    ("attributes_string", b"k", j({"attributes": "brand=acme"}), "bad_attributes"),
    ("attributes_nested", b"k", j({"attributes": {"brand": {"name": "acme"}}}), "bad_attributes"),
    ("attributes_list_value", b"k", j({"attributes": {"tags": ["a", "b"]}}), "bad_attributes"),
    ("attributes_too_many", b"k", j({"attributes": {f"a{n}": n for n in range(33)}}), "bad_attributes"),
    ("attribute_name_blank", b"k", j({"attributes": {" ": "x"}}), "bad_attributes"),
    ("attribute_name_long", b"k", j({"attributes": {"a" * 65: "x"}}), "bad_attributes"),
    ("attribute_value_long", b"k", j({"attributes": {"brand": "x" * 257}}), "bad_attributes"),
    ("attribute_number_overflow", b"k", b'{"attributes": {"size": ' + b"9" * 400 + b"}}", "invalid_json"),
]
WITHDRAWS = {"no_key", "empty_key", "blank_key", "huge_key", "long_item_id", "key_encoded_surrogate",
             "key_not_utf8"}  # these have no usable key: nothing to withdraw


def rejected() -> dict[str, float]:
    return {r: metrics.CATALOG_REJECTED.labels(r)._value.get() for r in REASONS}


def test_hostile_cases_cover_every_reason_but_internal():
    assert {reason for *_, reason in HOSTILE} == set(REASONS) - {"internal"}


@pytest.mark.parametrize("name,key,value,reason", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_record_is_rejected_and_withdraws_its_item(name, key, value, reason):
    catalog = Catalog()
    if name not in WITHDRAWS:  # the item was available: a broken record must not leave it served (fail closed)
        assert catalog.apply(key, j({"title": "valid"}))
    before = rejected()
    assert catalog.apply(key, value) is False
    assert catalog.last_reason == reason, catalog.last_detail
    assert catalog.last_detail is not None and len(catalog.last_detail) <= 200
    catalog.last_detail.encode("utf-8")  # fit for a log line and a DLQ header
    after = rejected()
    assert after[reason] == before[reason] + 1 and sum(after.values()) == sum(before.values()) + 1
    if name not in WITHDRAWS:
        assert key.decode().strip() in catalog.unavailable
        assert catalog.meta[key.decode().strip()]["title"] == "valid"  # last good metadata is kept


def test_attributes_are_kept_flat_and_typed():
    catalog = Catalog()
    assert catalog.apply(b"k", j({"category": "a > b", "price": 3, "attributes": {
        "brand": "acme", "eco": True, "size": 42, "gone": None}}))
    assert catalog.meta["k"]["attributes"] == {"brand": "acme", "eco": True, "size": 42.0}
    assert catalog.apply(b"k2", j({"title": "x"})) and catalog.meta["k2"]["attributes"] == {}


@pytest.mark.parametrize("depth", [5_000, 100_000])
@pytest.mark.parametrize("kind", ["list", "object"])
def test_deep_nesting_never_recurses(depth, kind):
    """Past the byte cap too: the parser itself stops deep values without RecursionError."""
    value = nested(depth) if kind == "list" else b'{"a":' * depth + b"1" + b"}" * depth
    catalog = Catalog(max_value_bytes=1 << 24)
    assert catalog.apply(b"k", value) is False and catalog.last_reason == "invalid_json"
    assert catalog.apply(b"k", b'{"item_id": "k", "extra": ' + value + b"}") is False
    assert catalog.last_reason == "invalid_json" and catalog.unavailable == {"k"}
    default = Catalog()  # with the default cap, 100,000 levels never reach the parser
    assert default.apply(b"k", value) is False
    assert default.last_reason == ("too_large" if len(value) > MAX_VALUE_BYTES else "invalid_json")


def test_valid_records_apply():
    catalog = Catalog()
    assert catalog.apply(b"i1", j({"item_id": "i1", "title": "Café ☕ mouse", "category": "peripherals",
                                   "price": 19, "available": True}))
    assert catalog.meta["i1"] == {"title": "Café ☕ mouse", "category": "peripherals", "price": 19.0, "attributes": {}}
    assert catalog.apply(b" i2 ", j({"item_id": "i2 ", "price": None}))  # stripped, as events strip item_id
    assert catalog.meta["i2"] == {"title": "", "category": "", "price": None, "attributes": {}}
    assert catalog.apply(b"i3", j({"title": None, "category": None}))  # no item_id in the value: the key's
    assert catalog.apply(b"i4", '{"title": "\\ud83d\\ude00"}'.encode())  # an escaped surrogate *pair* is fine
    assert catalog.meta["i4"]["title"] == "😀"
    assert catalog.apply(b"i5", j({"available": False, "extra": [[[1]]]}))  # unknown fields ignored
    assert catalog.unavailable == {"i5"} and catalog.last_reason is None
    assert catalog.apply(b"i1", None) and catalog.apply(b"i2", b"")  # tombstones (an empty value counts)
    assert catalog.unavailable == {"i1", "i2", "i5"}
    assert catalog.apply(b"i1", j({"title": "back"}))
    assert catalog.unavailable == {"i2", "i5"}
    gauge = metrics.CATALOG_ITEMS.labels
    assert (gauge("available")._value.get(), gauge("unavailable")._value.get()) == (3, 2)


def test_valid_record_applies_after_10000_hostile(caplog):
    catalog = Catalog()
    cycle = [h for h in HOSTILE if len(h[2] or b"") < 20_000]  # the cheap ones, so this takes ~a second
    before = rejected()
    with caplog.at_level(logging.WARNING, logger="stream_app.pipeline.catalog"):
        for n in range(10_000):
            _, key, value, reason = cycle[n % len(cycle)]
            assert catalog.apply(key, value) is False and catalog.last_reason == reason
        assert catalog.apply(b"k", j({"item_id": "k", "title": "Acme mouse", "available": True}))
    assert "k" in catalog.meta and "k" not in catalog.unavailable
    assert sum(rejected().values()) - sum(before.values()) == 10_000
    lines = Counter(r.getMessage().split("(")[1].split(")")[0] for r in caplog.records)
    assert set(lines) == {reason for *_, reason in cycle} and max(lines.values()) == 1, lines  # throttled


def test_throttled_log_reports_what_it_suppressed(caplog):
    now = [0.0]
    catalog = Catalog(log_interval_s=60, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="stream_app.pipeline.catalog"):
        for _ in range(5):
            catalog.apply(b"k", b"[")
        now[0] = 61.0
        catalog.apply(b"k", b"[")
    assert len(caplog.records) == 2 and "4 more since the last such line" in caplog.records[1].getMessage()


class _Index:
    """An ItemIndex stand-in whose add() fails the way a bug would."""

    def __init__(self, exc: BaseException | None) -> None:
        self.exc, self.added = exc, []

    def add(self, item_id, meta=None):
        if self.exc is not None:
            raise self.exc
        self.added.append(item_id)


def test_internal_error_is_counted_and_contained(caplog):
    catalog = Catalog()
    catalog.attach(_Index(RuntimeError("boom")))
    before = rejected()["internal"]
    with caplog.at_level(logging.WARNING, logger="stream_app.pipeline.catalog"):
        assert catalog.apply(b"k", j({"title": "x"})) is False
        assert catalog.apply(b"k2", j({"title": "x"})) is False
    assert catalog.last_reason == "internal" and rejected()["internal"] == before + 2
    assert {"k", "k2"} <= catalog.unavailable  # fail closed
    assert len(caplog.records) == 1 and caplog.records[0].exc_info  # once, with the traceback


def test_memory_error_propagates():
    catalog = Catalog()
    catalog.attach(_Index(MemoryError()))
    with pytest.raises(MemoryError):
        catalog.apply(b"k", j({"title": "x"}))


async def _records(pairs):
    for key, value in pairs:
        yield SimpleNamespace(key=key, value=value)


def test_apply_all_survives_every_record_and_a_failing_callback():
    catalog = Catalog()
    catalog.attach(_Index(None))
    seen: list[tuple] = []

    async def on_reject(key, value, reason):
        seen.append((key, reason))
        if len(seen) % 2:
            raise ConnectionError("dead-letter topic unreachable")

    pairs = [(k, v) for _, k, v, _ in HOSTILE] + [(b"good", j({"title": "Acme mouse"}))]
    asyncio.run(apply_all(catalog, _records(pairs), on_reject))
    assert [r for _, r in seen] == [reason for *_, reason in HOSTILE]
    assert catalog.meta["good"]["title"] == "Acme mouse" and "good" not in catalog.unavailable
    asyncio.run(apply_all(catalog, _records(pairs)))  # no callback: the same, silently


# --- a real worker on the real embedded broker ------------------------------------------------------

def hostile_stream(n: int) -> list[tuple[bytes | None, bytes | None]]:
    """n hostile records, each keyed by an id of its own where its case has a usable key."""
    out = []
    for i in range(n):
        name, key, value, _ = HOSTILE[i % len(HOSTILE)]
        if key == b"k":
            key = f"bad-{i}".encode()
            value = value.replace(b'"k"', json.dumps(f"bad-{i}").encode())
        out.append((key, value))
    return out


def _wait_for(worker, want: dict[str, float], timeout: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        assert worker.alive(), worker.log_tail()
        m = worker.metrics()
        if all(m.get(k) == v for k, v in want.items()):
            return m
        assert time.monotonic() < deadline, (want, {k: m.get(k) for k in want}, worker.log_tail())
        time.sleep(0.2)


@pytest.mark.integration
def test_worker_survives_hostile_catalog_and_restarts(make_settings, start_worker):
    """1,000 hostile catalog records among good ones: the worker applies the good ones, never
    recommends a withdrawn item, and starts again over the same compacted topic."""
    from stream_app.clients.produce import EventProducer
    from stream_app.testing.harness import TopicReader, metric_sum

    settings = make_settings()
    worker = start_worker(settings)
    goods = [(f"g{i}".encode(), j({"item_id": f"g{i}", "title": f"Acme gadget {i}", "category": "gadgets",
                                   "price": 9.5, "available": i < 40})) for i in range(50)]
    records = [(b"g0", j({"available": "false"}))] + goods[:25] + hostile_stream(1_000) + goods[25:]
    records += [(b"g39", j({"item_id": "g39", "available": 0}))]  # the newest word on g39 is broken: withdrawn
    producer = EventProducer(settings.bootstrap_servers, settings.catalog_topic, {"max_request_size": 1 << 21})
    for key, value in records:
        producer.send(value, key)
    producer.close()

    expected, reasons = Catalog(), Counter()  # what the worker must end with: the same records applied here
    for key, value in records:
        if not expected.apply(key, value):
            reasons[expected.last_reason] += 1
    assert sum(reasons.values()) == 1_002 and "internal" not in reasons
    available = {f"g{i}" for i in range(50)} - expected.unavailable
    assert available == {f"g{i}" for i in range(39)}
    want = {'streamrec_catalog_items{state="available"}': len(available),
            'streamrec_catalog_items{state="unavailable"}': len(expected.unavailable),
            **{f'streamrec_catalog_rejected_total{{reason="{r}"}}': n for r, n in reasons.items()}}
    _wait_for(worker, want)

    # events over every good item: recommendations are served, never a withdrawn item
    events = [{"event_id": f"e{n}", "user_id": f"u{n % 20}", "type": "view", "item_id": f"g{(n * 7) % 50}",
               "ts": 1_767_225_600 + n} for n in range(400)]
    events_producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    for e in events:
        events_producer.send_event(e)
    events_producer.flush()
    reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
    recs = reader.read_until(lambda rs: {json.loads(r.value)["user_id"] for r in rs} >= {f"u{n}" for n in range(20)},
                             timeout=60)
    items = {i["item_id"] for r in recs for i in json.loads(r.value)["items"]}
    assert items and items <= available, items - available

    # restart: the compacted topic replays the hostile records, and the worker starts all the same
    worker.stop()
    again = start_worker(settings, name="restarted")
    _wait_for(again, {k: v for k, v in want.items() if "catalog_items" in k})
    assert metric_sum(again.metrics(), "streamrec_catalog_rejected_total") >= 990  # compaction may drop a few
    last = {"event_id": "after-restart", "user_id": "u1", "type": "view", "item_id": "g1", "ts": 1_767_230_000}
    events_producer.send_event(last)
    events_producer.close()
    tail = reader.read_until(lambda rs: any(json.loads(r.value)["event_id"] == "after-restart" for r in rs), 60)
    mine = [json.loads(r.value) for r in tail if json.loads(r.value)["event_id"] == "after-restart"]
    assert mine and {i["item_id"] for i in mine[0]["items"]} <= available
    assert again.alive()
    reader.close()
