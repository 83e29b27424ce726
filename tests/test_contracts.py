"""docs/schemas/*.json and docs/openapi.yaml against docs/contracts.md and the code: the
documented samples validate, the hostile event samples mostly do not, the OpenAPI
document names every page the worker serves, and records the processor publishes
validate (live records and lookup answers are checked in tests/pipeline/test_lookup.py)."""
from __future__ import annotations

import json
import random
import re

import pytest

from stream_app.config import Settings
from stream_app.pipeline.processor import BatchProcessor, Message
from stream_app.serving.recommender import CoOccurrenceRecommender
from stream_app.testing.hostile import CASES
from tests.contract_schemas import DOCS, component, errors, openapi, record

CONTRACTS = (DOCS / "contracts.md").read_text()


def samples(section: str) -> list[dict]:
    """The JSON objects of the first ```json block under `## <section>` in contracts.md."""
    body = CONTRACTS.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```json\n(.*?)```", body, re.S).group(1)
    return [json.loads(obj) for obj in re.findall(r"^\{.*?\}$", block, re.S | re.M)]


@pytest.mark.parametrize("section, name", [("Event", "event"), ("Recommendation", "recommendation"),
                                           ("Catalog item", "catalog-item"), ("Trending snapshot", "trending-snapshot")])
def test_documented_samples_validate(section, name):
    docs = samples(section)
    assert docs
    for doc in docs:
        assert not errors(record(name), doc), doc


def test_a_forget_and_a_catalog_tombstone_free_record_validate():
    assert not errors(record("event"), {"event_id": "f1", "user_id": "u42", "type": "forget", "ts": 1767225600})
    assert not errors(record("catalog-item"), {"item_id": "i1", "available": False})
    assert errors(record("catalog-item"), {"available": "false"})  # a string is not a boolean
    assert errors(record("catalog-item"), {"price": "9.90"})


# what a JSON Schema cannot see: sizes in bytes and encodings of what it is handed
SCHEMA_BLIND = {"too_large", "invalid_utf8"}


def not_json(constant: str):
    raise ValueError(f"{constant} is not JSON")


def test_hostile_events_mostly_do_not_validate():
    rng = random.Random(7)
    valid, parsed = [], 0
    for n, (make, reason) in enumerate(CASES):
        payload = make(rng, n)
        try:
            doc = json.loads(payload.decode("utf-8"), parse_constant=not_json)  # strict JSON: no NaN
        except (UnicodeDecodeError, ValueError, RecursionError):
            continue  # not JSON: no schema applies, and the worker dead-letters it before any
        parsed += 1
        if not errors(record("event"), doc):
            valid.append(reason)
    assert parsed > len(CASES) // 2
    assert set(valid) <= SCHEMA_BLIND, f"hostile samples the event schema accepts: {valid}"
    assert len(valid) <= 3


def test_published_records_validate():
    proc = BatchProcessor(Settings(), CoOccurrenceRecommender())
    events = [{"event_id": f"e{n}", "user_id": f"u{n % 3}", "type": "click", "item_id": f"i{n % 5}",
               "ts": 1_767_225_600 + n} for n in range(30)]
    out = proc.process([Message(e["user_id"].encode(), json.dumps(e).encode(), e["ts"], 0, n)
                        for n, e in enumerate(events)], lambda _: None)
    assert out.recommendations
    for (_, rec), (_, value) in zip(out.recommendations, out.published):
        assert rec["schema_version"] == 1 and json.loads(value) == rec
        assert not errors(record("recommendation"), rec), rec


def test_openapi_names_every_page_and_its_schemas_are_valid():
    doc = openapi()
    assert doc["openapi"].startswith("3.")
    assert set(doc["paths"]) == {"/metrics", "/healthz", "/readyz", "/recommendations/{user_id}", "/recommendations",
                                 "/surfaces/{name}"}
    for name in doc["components"]["schemas"]:
        component(name)  # check_schema


def test_contracts_cite_the_schemas():
    for path in ("openapi.yaml", "schemas/event.schema.json", "schemas/recommendation.schema.json",
                 "schemas/catalog-item.schema.json", "schemas/trending-snapshot.schema.json"):
        assert f"]({path})" in CONTRACTS, path
