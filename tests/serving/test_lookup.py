"""The lookup API's rules (stream_app/serving/lookup.py): query and batch validation, each
refusal one line naming the fix; a published list filtered and cut, never recomputed; the
fallback for users without one. Answers validate against docs/openapi.yaml."""
from __future__ import annotations

import json
import urllib.parse

import pytest

from stream_app.pipeline.latest import encode_record
from stream_app.serving import lookup
from model.rules import Boost, Rules
from stream_app.serving.lookup import BadRequest, Query
from tests.contract_schemas import component, errors

RECORD = {"user_id": "u1", "event_id": "e9", "items": [{"item_id": f"i{n}", "score": 1.0 - n / 10} for n in range(5)],
          "model_version": "v1", "variant": "default", "generated_at": 1767225600.5, "event_ts": 1767225600.0,
          "latency_ms": 3.2, "schema_version": 1}
META = {"i0": {"category": "mice"}, "i2": {"category": "mice"}, "i3": {"category": "desks"}}


def refusal(call) -> str:
    with pytest.raises(BadRequest) as info:
        call()
    assert "\n" not in info.value.message and info.value.status in (400, 413)
    assert not errors(component("Error"), lookup.error(info.value.message))
    return info.value.message


def test_query_defaults_and_values():
    assert lookup.parse_query([], 10) == (Query(10), {})
    q, extra = lookup.parse_query([("k", "3"), ("exclude", "i1, i2,,"), ("category", " mice ")], 10)
    assert q == Query(3, Rules(exclude=frozenset({"i1", "i2"}), categories=("mice",))) and extra == {}
    assert lookup.parse_query(urllib.parse.parse_qsl(q.to_params()), 10)[0] == q


def test_every_rule_parses_and_round_trips_through_the_query_string():
    params = [("k", "5"), ("category", "a > b"), ("category", "c"), ("exclude_category", "gift cards"),
              ("price_min", "1.5"), ("price_max", "20"), ("max_per_category", "2"), ("boost", "brand:acme:0.5"),
              ("boost", "eco:true:-1"), ("boost", "note:a:b:0.25"), ("item_id", "i9")]
    q, extra = lookup.parse_query(params, 10, ("item_id",))
    assert extra == {"item_id": "i9"}
    assert q.rules == Rules(categories=("a > b", "c"), exclude_categories=("gift cards",), price_min=1.5,
                            price_max=20.0, max_per_category=2,
                            boost=(Boost("brand", "acme", 0.5), Boost("eco", True, -1.0), Boost("note", "a:b", 0.25)))
    assert lookup.parse_query(urllib.parse.parse_qsl(q.to_params()), 10)[0] == q
    body = {"user_ids": ["u"], "k": 5, "category": ["a > b", "c"], "exclude_category": ["gift cards"],
            "price_min": 1.5, "price_max": 20, "max_per_category": 2,
            "boost": [{"attribute": "brand", "value": "acme", "weight": 0.5},
                      {"attribute": "eco", "value": True, "weight": -1},
                      {"attribute": "note", "value": "a:b", "weight": 0.25}]}
    assert lookup.parse_batch(json.dumps(body).encode(), 10) == (["u"], q)


@pytest.mark.parametrize("params, words", [
    ([("k", "0")], "from 1 to 10"), ([("k", "11")], "from 1 to 10"), ([("k", "-1")], "from 1 to 10"),
    ([("k", "abc")], "integer"), ([("k", "2.5")], "integer"), ([("k", "9" * 5000)], "integer"),
    ([("k", "1"), ("k", "2")], "twice"), ([("limit", "5")], "unknown query parameter"),
    ([("category", "")], "empty"), ([("category", "c" * 300)], "limit is 256"),
    ([("exclude", ",".join(f"i{n}" for n in range(201)))], "at most 200"),
    ([("exclude", "i" * 129)], "limit is 128"), ([("category", "bad\ud800")], "UTF-8"),
    ([("price_min", "cheap")], "finite number"), ([("price_max", "nan")], "finite number"),
    ([("price_min", "inf")], "finite number"), ([("price_min", "9"), ("price_max", "1")], "swap them"),
    ([("max_per_category", "0")], "from 1 to 1000"), ([("max_per_category", "x")], "integer"),
    ([("boost", "brand")], "attribute:value:weight"), ([("boost", "brand:acme")], "attribute:value:weight"),
    ([("boost", "brand:acme:11")], "within ±10"), ([("boost", ":acme:1")], "attribute:value:weight"),
    ([("category", "c")] * 21, "more than 20 times"), ([("price_min", "1"), ("price_min", "2")], "twice"),
    ([("item_id", "i1")], "unknown query parameter"),
])
def test_bad_queries_are_refused_with_the_fix(params, words):
    assert words in refusal(lambda: lookup.parse_query(params, 10))


@pytest.mark.parametrize("user_id, words", [("", "empty"), ("   ", "empty"), ("u" * 129, "limit is 128"),
                                            ("u\udcff", "UTF-8"), (7, "string")])
def test_bad_user_ids_are_refused(user_id, words):
    assert words in refusal(lambda: lookup.parse_user_id(user_id))


def test_batch_body():
    ids, q = lookup.parse_batch(json.dumps({"user_ids": ["a", " b "], "k": 2, "exclude": ["i1"]}).encode(), 10)
    assert ids == ["a", "b"] and q == Query(2, Rules(exclude=frozenset({"i1"})))
    assert not errors(component("BatchRequest"), {"user_ids": ["a", "b"], "k": 2, "exclude": ["i1"]})


@pytest.mark.parametrize("body, words", [
    (b"", "not valid JSON"), (b"{", "not valid JSON"), (b'{"user_ids": [NaN]}', "not valid JSON"),
    (b"[" * 5000 + b"]" * 5000, "not valid JSON"), (b'{"user_ids": [1e999999]}', "not valid JSON"),
    (b'{"user_ids": [' + b"9" * 5000 + b"]}", "not valid JSON"), (b"\xff\xfe", "not valid JSON"),
    (b"[]", "JSON object"), (b'"u1"', "JSON object"), (b"{}", "non-empty list"),
    (b'{"user_ids": "u1"}', "non-empty list"), (b'{"user_ids": []}', "non-empty list"),
    (json.dumps({"user_ids": [f"u{n}" for n in range(101)]}).encode(), "at most 100"),
    (json.dumps({"user_ids": ["u" * 129]}).encode(), "limit is 128"),
    (json.dumps({"user_ids": [None]}).encode(), "string"),
    (json.dumps({"user_ids": ["u"], "k": "all"}).encode(), "integer"),
    (json.dumps({"user_ids": ["u"], "k": True}).encode(), "integer"),
    (json.dumps({"user_ids": ["u"], "exclude": "i1"}).encode(), "list of item ids"),
    (json.dumps({"user_ids": ["u"], "users": []}).encode(), "unknown field"),
    (json.dumps({"user_ids": ["u"], "pad": "x" * 70_000}).encode(), "over 65536 bytes"),
    (json.dumps({"user_ids": ["u"], "boost": ["brand:acme:1"]}).encode(), "attribute, value and weight"),
    (json.dumps({"user_ids": ["u"], "boost": [{"attribute": "b", "value": [1], "weight": 1}]}).encode(),
     "string, a finite number or a boolean"),
    (json.dumps({"user_ids": ["u"], "price_min": "1"}).encode(), "finite number"),
    (json.dumps({"user_ids": ["u"], "price_min": True}).encode(), "finite number"),
    (json.dumps({"user_ids": ["u"], "exclude_category": "c"}).encode(), "must be a list"),
    (json.dumps({"user_ids": ["u"], "category": ["c"] * 21}).encode(), "at most 20"),
])
def test_hostile_batch_bodies_are_refused(body, words):
    assert words in refusal(lambda: lookup.parse_batch(body, 10))


def test_published_list_is_filtered_and_cut_never_recomputed():
    value = encode_record(RECORD)
    whole = lookup.published(value, Query(10), set(), META)
    assert whole["items"] == RECORD["items"] and whole["source"] == "published" and not whole["complete"]
    assert {k: whole[k] for k in RECORD} == RECORD
    cut = lookup.published(value, Query(2), set(), META)
    assert [i["item_id"] for i in cut["items"]] == ["i0", "i1"] and cut["complete"]
    filtered = lookup.published(value, Query(2, Rules(exclude=frozenset({"i0"}))), {"i1"}, META)  # i1 withdrawn
    assert [i["item_id"] for i in filtered["items"]] == ["i2", "i3"]
    mice = lookup.published(value, Query(3, Rules(categories=("MICE",))), set(), META)
    assert [i["item_id"] for i in mice["items"]] == ["i0", "i2"] and not mice["complete"]
    old = lookup.published(encode_record({k: v for k, v in RECORD.items() if k != "schema_version"}), Query(1),
                           set(), META)
    assert old["schema_version"] == 1  # records from before the field read as version 1
    for answer in (whole, cut, filtered, mice, old):
        assert not errors(component("Lookup"), answer), answer


def test_fallback_is_the_popular_items_that_pass():
    popular = [(f"i{n}", 0.5 / (n + 1)) for n in range(6)]
    answer = lookup.fallback("new", Query(3, Rules(exclude=frozenset({"i1"}))), popular, "cooccurrence-v1", {"i0"},
                             META)
    assert [i["item_id"] for i in answer["items"]] == ["i2", "i3", "i4"]
    assert {i["reason"] for i in answer["items"]} == {"fallback"}
    assert answer["source"] == "fallback" and answer["model_version"] == "cooccurrence-v1" and answer["complete"]
    assert not errors(component("Lookup"), answer)
    desks = lookup.fallback("new", Query(3, Rules(categories=("desks",))), popular, "cooccurrence-v1", set(), META)
    assert [i["item_id"] for i in desks["items"]] == ["i3"] and not desks["complete"]
    assert lookup.pool_size(Query(3, Rules(categories=("desks",))), 0) == lookup.FALLBACK_POOL
    assert lookup.pool_size(Query(3), 10) == 100
