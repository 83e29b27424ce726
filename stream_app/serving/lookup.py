"""The lookup API's rules, without a web server (so they are unit-testable): what a request
may ask (`k`, `exclude`, `category`, a batch of users), what answers it, and every way a
hostile request is refused with a 400 naming the fix (docs/contracts.md, "Lookup API").

A user with a published list gets that list, filtered, never recomputed: a lookup answers
what subscribers of the recommendations topic got, so the two never disagree. Items
withdrawn from the catalog since, `exclude`d ones and other categories are removed, then
the list is cut to `k`; `complete` says whether `k` remain. A user without one (new, or
forgotten) gets the popularity backfill of the co-occurrence baseline, `source: fallback`.
"""
from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import orjson

from stream_app.pipeline.latest import SCHEMA_VERSION

MAX_USER_ID = 128  # characters, as the event contract
MAX_ITEM_ID = 128
MAX_CATEGORY = 256
MAX_EXCLUDE = 200  # item ids per request
MAX_BATCH = 100  # users per POST /recommendations
MAX_BODY_BYTES = 64 * 1024
FALLBACK_POOL = 5000  # popular items a filtered fallback looks through
QUERY_PARAMS = ("k", "exclude", "category")


class BadRequest(Exception):
    """A request the API refuses; `message` is the one-line reason, naming the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True, slots=True)
class Query:
    k: int
    exclude: frozenset[str] = frozenset()
    category: str | None = None

    def to_params(self) -> str:
        """The query string that asks another worker the same."""
        params: dict[str, Any] = {"k": self.k}
        if self.exclude:
            params["exclude"] = ",".join(sorted(self.exclude))
        if self.category is not None:
            params["category"] = self.category
        return urllib.parse.urlencode(params)


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _text(value: Any, what: str, limit: int) -> str:
    if not isinstance(value, str):
        raise BadRequest(f"{what} must be a string, got {type(value).__name__}")
    value = value.strip()
    if not value:
        raise BadRequest(f"{what} is empty")
    if len(value) > limit:
        raise BadRequest(f"{what} is {len(value)} characters; the limit is {limit}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRequest(f"{what} is not valid UTF-8 (a lone surrogate such as \\ud800)") from None
    return value


def parse_user_id(value: Any) -> str:
    return _text(value, "user_id", MAX_USER_ID)


def parse_k(value: Any, top_k: int) -> int:
    """1..top_k: the published list holds top_k items, so more cannot be answered."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) < 10:
        value = int(value)
    if type(value) is not int or not 1 <= value <= top_k:
        raise BadRequest(f"k must be an integer from 1 to {top_k}, got {_shown(value)}")
    return value


def parse_exclude(ids: Iterable[Any]) -> frozenset[str]:
    out = set()
    for n, item in enumerate(ids):
        if n >= MAX_EXCLUDE:
            raise BadRequest(f"exclude names more than {MAX_EXCLUDE} item ids; send at most {MAX_EXCLUDE}")
        out.add(_text(item, "an exclude item id", MAX_ITEM_ID))
    return frozenset(out)


def parse_query(params: Iterable[tuple[str, str]], top_k: int) -> Query:
    """A GET's query string (name, value pairs, repeated names included)."""
    seen: dict[str, str] = {}
    for name, value in params:
        if name not in QUERY_PARAMS:
            raise BadRequest(f"unknown query parameter {_shown(name)}; use k, exclude or category")
        if name in seen:
            raise BadRequest(f"{name} is given twice; give it once")
        seen[name] = value
    exclude = seen.get("exclude")
    return Query(
        k=parse_k(seen["k"], top_k) if "k" in seen else top_k,
        exclude=parse_exclude(i for i in exclude.split(",") if i.strip()) if exclude else frozenset(),
        category=_text(seen["category"], "category", MAX_CATEGORY) if "category" in seen else None)


def parse_batch(body: bytes, top_k: int) -> tuple[list[str], Query]:
    """A POST's JSON body: {"user_ids": [...], "k": .., "exclude": [...], "category": ..}."""
    if len(body) > MAX_BODY_BYTES:
        raise BadRequest(f"the body is over {MAX_BODY_BYTES} bytes; send at most {MAX_BATCH} user ids", 413)
    try:
        doc = orjson.loads(body)  # NaN, numbers no double holds and nesting past 1,024 levels are errors
    except (orjson.JSONDecodeError, ValueError, RecursionError) as exc:
        raise BadRequest(f"the body is not valid JSON ({str(exc)[:80]}); send a JSON object") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"the body must be a JSON object with user_ids, got {type(doc).__name__}")
    unknown = sorted(set(doc) - {"user_ids", *QUERY_PARAMS})
    if unknown:
        raise BadRequest(f"unknown field {_shown(unknown[0])}; use user_ids, k, exclude or category")
    ids = doc.get("user_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("user_ids must be a non-empty list of user ids")
    if len(ids) > MAX_BATCH:
        raise BadRequest(f"user_ids has {len(ids)} ids; send at most {MAX_BATCH} per request")
    exclude = doc.get("exclude")
    if exclude is not None and not isinstance(exclude, list):
        raise BadRequest("exclude must be a list of item ids")
    category = doc.get("category")
    query = Query(k=parse_k(doc["k"], top_k) if doc.get("k") is not None else top_k,
                  exclude=parse_exclude(exclude or ()),
                  category=None if category is None else _text(category, "category", MAX_CATEGORY))
    return [parse_user_id(u) for u in ids], query


def _keep(item_id: Any, query: Query, unavailable: Any, meta: Mapping[str, dict]) -> bool:
    if item_id in unavailable or item_id in query.exclude:
        return False
    return query.category is None or (meta.get(item_id) or {}).get("category") == query.category


def published(value: bytes, query: Query, unavailable: Any, meta: Mapping[str, dict]) -> dict:
    """The answer for a user with a published list: that record, its items filtered."""
    record = orjson.loads(value)
    items = [i for i in record.get("items", ()) if _keep(i.get("item_id"), query, unavailable, meta)][:query.k]
    return {**record, "items": items, "schema_version": record.get("schema_version", SCHEMA_VERSION),
            "source": "published", "k": query.k, "complete": len(items) == query.k}


def fallback(user_id: str, query: Query, popular: list[tuple[str, float]], version: str,
             unavailable: Any, meta: Mapping[str, dict]) -> dict:
    """The answer for a user with no published list: the most popular items that pass."""
    items = []
    for item_id, share in popular:
        if _keep(item_id, query, unavailable, meta):
            items.append({"item_id": item_id, "score": round(float(share), 6)})
            if len(items) == query.k:
                break
    return {"user_id": user_id, "items": items, "model_version": version, "variant": "default",
            "generated_at": round(time.time(), 3), "schema_version": SCHEMA_VERSION, "source": "fallback",
            "k": query.k, "complete": len(items) == query.k}


def pool_size(query: Query, unavailable_count: int) -> int:
    """How many popular items a fallback needs to look through to fill `k`."""
    if query.category is not None:
        return FALLBACK_POOL
    return min(FALLBACK_POOL, max(100, query.k + len(query.exclude) + unavailable_count))


def error(message: str) -> dict:
    return {"error": message}
