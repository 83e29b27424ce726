"""`GET /surfaces/{name}` against real workers serving a trained checkpoint: similar items
(a catalog item added a moment ago included), a user's list live with request rules, the
list after a search; user surfaces answered from any of two workers (forwarded to the
owner); random rules per request never broken; every answer and published record
validates against the published schemas and carries a reason per item."""
from __future__ import annotations

import json
import random
import time
import urllib.parse

import pytest

from model.rules import violations
from stream_app.clients.produce import EventProducer
from stream_app.serving.lookup import parse_query
from stream_app.transport.broker import free_port
from tests.contract_schemas import component, errors, record
from tests.helpers import wait_until
from tests.pipeline.test_lookup import get, produce, topic_latest

pytestmark = pytest.mark.integration
SURFACES = """
[surfaces.for_you]
kind = "user"
rules = { max_per_category = 4 }

[surfaces.similar]
kind = "similar"

[surfaces.after_search]
kind = "search"

[surfaces.cheap_for_you]
kind = "user"
k = 5
rules = { price_max = 80 }
"""


def catalog_rows(rows: list[dict]) -> list[dict]:
    """The world's catalog with attributes rules can boost by."""
    return [{**r, "attributes": {"brand": r["title"].split()[0], "eco": n % 3 == 0}} for n, r in enumerate(rows)]


def surface(worker, name: str, **params) -> dict:
    status, body = get(worker, f"/surfaces/{name}?{urllib.parse.urlencode(params, doseq=True)}")
    assert status == 200, (name, params, status, body)
    assert not errors(component("Surface"), body), body
    assert all(i.get("reason") for i in body["items"]), body
    return body


def random_rules(rng: random.Random, meta: dict[str, dict]) -> list[tuple[str, str]]:
    categories = sorted({m["category"] for m in meta.values()})
    params = []
    if rng.random() < 0.5:
        params.append(("category", rng.choice(categories)))
        if rng.random() < 0.5:
            params.append(("category", rng.choice(categories)))
    if rng.random() < 0.4:
        params.append(("exclude_category", rng.choice(categories)))
    if rng.random() < 0.4:
        low = rng.uniform(0, 150)
        params += [("price_min", f"{low:.2f}"), ("price_max", f"{low + rng.uniform(5, 200):.2f}")]
    if rng.random() < 0.5:
        params.append(("max_per_category", str(rng.randint(1, 3))))
    if rng.random() < 0.3:
        params.append(("exclude", ",".join(rng.sample(sorted(meta), 5))))
    if rng.random() < 0.3:
        params.append(("boost", f"eco:true:{rng.uniform(-1, 1):.2f}"))
    return params


def test_surfaces_live(world, make_settings, start_worker, tmp_path):
    events, rows, ckpt = world
    rows = catalog_rows(rows)
    meta = {r["item_id"]: r for r in rows}
    surfaces = tmp_path / "surfaces.toml"
    surfaces.write_text(SURFACES)
    a_settings = make_settings(model_dir=ckpt, history_max=60, partitions=4, surfaces_file=surfaces)
    producer = EventProducer(a_settings.bootstrap_servers, a_settings.catalog_topic)
    for r in rows:
        producer.send(json.dumps(r).encode(), r["item_id"].encode())
    producer.close()
    a = start_worker(a_settings, "a")
    b = start_worker(a_settings.model_copy(update={"state_dir": tmp_path / "state-b", "web_port": free_port()}), "b")
    wait_until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 60, "the workers to split 4 partitions")
    sent = events[:1500]
    produce(a_settings, sent)
    latest = topic_latest(a_settings, sent)
    for rec in latest.values():  # the published list: the for_you surface's rules, a reason per item
        assert not errors(record("recommendation"), rec), rec
        assert all(i["reason"] for i in rec["items"]) and not violations(
            [i["item_id"] for i in rec["items"]], parse_query([("max_per_category", "4")], 10)[0].rules, meta)
    a.wait_ready(30), b.wait_ready(30)

    item = rows[5]["item_id"]
    similar = surface(a, "similar", item_id=item)
    assert similar["kind"] == "similar" and similar["item_id"] == item and len(similar["items"]) == 10
    assert item not in [i["item_id"] for i in similar["items"]]
    assert [i["item_id"] for i in surface(b, "similar", item_id=item)["items"]] == \
        [i["item_id"] for i in similar["items"]]  # any worker answers an item page the same

    producer = EventProducer(a_settings.bootstrap_servers, a_settings.catalog_topic)
    producer.send(json.dumps({"item_id": "i-new", "title": rows[0]["title"] + " mk2", "category": rows[0]["category"],
                              "price": 10.0}).encode(), b"i-new")
    producer.close()
    added = time.monotonic()
    wait_until(lambda: get(a, "/surfaces/similar?item_id=i-new")[1].get("model_version", "").startswith("cooc")
               is False, 10, "the new item's neighbours from the model")
    fresh = surface(a, "similar", item_id="i-new")
    assert fresh["items"] and fresh["source"] == "live" and time.monotonic() - added < 10

    rng = random.Random(7)
    users = sorted(latest)
    checked = 0
    for n, user in enumerate(users[:60]):
        worker = (a, b)[n % 2]  # half of them forwarded to the owner
        params = random_rules(rng, meta)
        body = surface(worker, "for_you", user_id=user, **_multi(params))
        rules = parse_query(params, 10)[0].rules
        assert body["user_id"] == user and not violations([i["item_id"] for i in body["items"]], rules, meta), \
            (params, body["items"])
        checked += 1
        cheap = surface(worker, "cheap_for_you", user_id=user)
        assert len(cheap["items"]) <= 5 and all(meta[i["item_id"]]["price"] <= 80 for i in cheap["items"]
                                                if i["item_id"] in meta)
    assert checked == 60

    user = users[0]
    after = surface(b, "after_search", user_id=user, query="wireless earbuds")
    assert after["query"] == "wireless earbuds" and after["items"]
    matched = [i for i in after["items"] if i["reason"].startswith("search:")]
    assert all({"wireless", "earbuds"} & set(meta[i["item_id"]]["title"].lower().split()) for i in matched)
    assert surface(a, "after_search", user_id="nobody-yet", query="wireless earbuds")["items"]

    for path, status in [("/surfaces/nope?user_id=u1", 404), ("/surfaces/for_you", 400),
                         ("/surfaces/similar?user_id=u1", 400), ("/surfaces/after_search?user_id=u1", 400),
                         ("/surfaces/for_you?user_id=u1&k=11", 400), ("/surfaces/for_you?user_id=u1&boost=x", 400),
                         ("/surfaces/similar?item_id=" + "i" * 200, 400),
                         ("/surfaces/after_search?user_id=u1&query=" + "q" * 600, 400)]:
        code, body = get(a, path)
        assert code == status and "\n" not in body["error"], (path, code, body)
    assert a.alive() and b.alive()


def _multi(params: list[tuple[str, str]]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for name, value in params:
        out.setdefault(name, []).append(value)
    return out
