"""The lookup API's rules, without a web server (so they are unit-testable): what a request
may ask (`k`, the rules of model/rules.py as query parameters or JSON fields, a batch of
users, a surface's own parameters), what answers it, and every way a hostile request is
refused with a 400 naming the fix (docs/contracts.md, "Lookup API").

A user with a published list gets that list, with the request's rules applied to it, never
recomputed: a lookup answers what subscribers of the recommendations topic got, so the two
never disagree. Items withdrawn from the catalog since are removed, the rules filter,
boost and diversify, then the list is cut to `k`; `complete` says whether `k` remain. A
user without one (new, or forgotten) gets the popularity backfill of the co-occurrence
baseline, `source: fallback`. Surfaces (`/surfaces/{name}`) are computed live.
"""
from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import math

import orjson

from model.rules import EMPTY, MAX_BOOST_WEIGHT, Boost, Rules, apply
from stream_app.pipeline.latest import SCHEMA_VERSION

MAX_USER_ID = 128  # characters, as the event contract
MAX_ITEM_ID = 128
MAX_CATEGORY = 256
MAX_EXCLUDE = 200  # item ids per request
MAX_BATCH = 100  # users per POST /recommendations
MAX_BODY_BYTES = 64 * 1024
FALLBACK_POOL = 5000  # popular items a filtered fallback looks through
RULE_PARAMS = ("exclude", "category", "exclude_category", "price_min", "price_max", "max_per_category", "boost")
QUERY_PARAMS = ("k", *RULE_PARAMS)
REPEATABLE = ("category", "exclude_category", "boost")  # each occurrence adds one
MAX_REPEAT = 20
MAX_PER_CATEGORY = 1000


class BadRequest(Exception):
    """A request the API refuses; `message` is the one-line reason, naming the fix."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message, self.status = message, status


@dataclass(frozen=True, slots=True)
class Query:
    k: int
    rules: Rules = EMPTY

    def to_params(self) -> str:
        """The query string that asks another worker the same."""
        return urllib.parse.urlencode([("k", str(self.k)), *rule_params(self.rules)])


def rule_params(rules: Rules) -> list[tuple[str, str]]:
    """`rules` as query parameters (what `parse_query` reads back)."""
    out: list[tuple[str, str]] = []
    if rules.exclude:
        out.append(("exclude", ",".join(sorted(rules.exclude))))
    for r in (rules, *rules.also):
        out += [("category", c) for c in r.categories]
    out += [("exclude_category", c) for c in rules.exclude_categories]
    out += [(name, repr(v)) for name, v in (("price_min", rules.price_min), ("price_max", rules.price_max))
            if v is not None]
    if rules.max_per_category:
        out.append(("max_per_category", str(rules.max_per_category)))
    out += [("boost", f"{b.attribute}:{str(b.value).lower() if isinstance(b.value, bool) else b.value}:{b.weight!r}")
            for b in rules.boost]
    return out


def _shown(value: Any, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def parse_text(value: Any, what: str, limit: int) -> str:
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
    return parse_text(value, "user_id", MAX_USER_ID)


def parse_k(value: Any, top_k: int, what: str = "k") -> int:
    """1..top_k: the published list holds top_k items, so more cannot be answered."""
    if isinstance(value, str) and value.strip().isascii() and value.strip().isdigit() and len(value) < 10:
        value = int(value)
    if type(value) is not int or not 1 <= value <= top_k:
        raise BadRequest(f"{what} must be an integer from 1 to {top_k}, got {_shown(value)}")
    return value


def parse_exclude(ids: Iterable[Any]) -> frozenset[str]:
    out = set()
    for n, item in enumerate(ids):
        if n >= MAX_EXCLUDE:
            raise BadRequest(f"exclude names more than {MAX_EXCLUDE} item ids; send at most {MAX_EXCLUDE}")
        out.add(parse_text(item, "an exclude item id", MAX_ITEM_ID))
    return frozenset(out)


def parse_query(params: Iterable[tuple[str, str]], top_k: int,
                extra: tuple[str, ...] = ()) -> tuple[Query, dict[str, str]]:
    """A GET's query string (name, value pairs, repeated names included) -> the query and
    the values of the `extra` parameters a surface takes (user_id, item_id, query)."""
    seen: dict[str, list[str]] = {}
    for name, value in params:
        if name not in QUERY_PARAMS and name not in extra:
            allowed = ", ".join((*QUERY_PARAMS, *extra))
            raise BadRequest(f"unknown query parameter {_shown(name)}; use {allowed}")
        if name in seen and name not in REPEATABLE:
            raise BadRequest(f"{name} is given twice; give it once")
        if len(seen.setdefault(name, [])) >= MAX_REPEAT:
            raise BadRequest(f"{name} is given more than {MAX_REPEAT} times")
        seen[name].append(value)
    one = {name: values[0] for name, values in seen.items()}
    exclude = one.get("exclude")
    rules = _rules(exclude=(i for i in exclude.split(",") if i.strip()) if exclude else (),
                   categories=seen.get("category", ()), exclude_categories=seen.get("exclude_category", ()),
                   price_min=one.get("price_min"), price_max=one.get("price_max"),
                   max_per_category=one.get("max_per_category"), boost=[_boost_text(b) for b in seen.get("boost", ())])
    query = Query(k=parse_k(one["k"], top_k) if "k" in one else top_k, rules=rules)
    return query, {name: one[name] for name in extra if name in one}


def _rules(exclude: Iterable[Any] = (), categories: Iterable[Any] = (), exclude_categories: Iterable[Any] = (),
           price_min: Any = None, price_max: Any = None, max_per_category: Any = None,
           boost: Iterable[Boost] = ()) -> Rules:
    """Validated Rules from request values (strings from a query string, JSON values from a body)."""
    low, high = _price(price_min, "price_min"), _price(price_max, "price_max")
    if low is not None and high is not None and low > high:
        raise BadRequest(f"price_min {low:g} is above price_max {high:g}; swap them")
    cap = 0
    if max_per_category is not None:
        cap = parse_k(max_per_category, MAX_PER_CATEGORY, "max_per_category")
    return Rules(categories=tuple(parse_text(c, "category", MAX_CATEGORY) for c in categories),
                 exclude_categories=tuple(parse_text(c, "exclude_category", MAX_CATEGORY) for c in exclude_categories),
                 price_min=low, price_max=high, exclude=parse_exclude(exclude), max_per_category=cap,
                 boost=tuple(boost))


def _price(value: Any, what: str) -> float | None:
    if value is None:
        return None
    try:
        price = float(value) if isinstance(value, str) or type(value) in (int, float) else None
    except (ValueError, OverflowError):
        price = None
    if price is None or not math.isfinite(price):
        raise BadRequest(f"{what} must be a finite number, got {_shown(value)}")
    return price


def _boost_text(text: str) -> Boost:
    """`attribute:value:weight` (the value may hold colons; true/false and numbers are typed)."""
    attribute, _, rest = text.partition(":")
    value, _, weight = rest.rpartition(":")
    if not attribute.strip() or not value.strip():
        raise BadRequest(f"boost {_shown(text)} must be attribute:value:weight, e.g. brand:acme:0.5")
    typed: str | float | bool = value.strip()
    if typed in ("true", "false"):
        typed = typed == "true"
    else:
        try:
            number = float(typed)
            typed = number if math.isfinite(number) else typed
        except ValueError:
            pass
    return _boost(attribute, typed, weight)


def _boost(attribute: Any, value: Any, weight: Any) -> Boost:
    attribute = parse_text(attribute, "a boost's attribute", 64)
    if isinstance(value, str):
        value = parse_text(value, "a boost's value", 256)
    elif not isinstance(value, (bool, int, float)) or (not isinstance(value, bool) and not math.isfinite(value)):
        raise BadRequest("a boost's value must be a string, a finite number or a boolean")
    w = _price(weight, "a boost's weight")
    if abs(w) > MAX_BOOST_WEIGHT:
        raise BadRequest(f"a boost's weight must be within ±{MAX_BOOST_WEIGHT:g} (1 lifts above every other "
                         f"candidate), got {w:g}")
    return Boost(attribute, value, w)


def parse_batch(body: bytes, top_k: int) -> tuple[list[str], Query]:
    """A POST's JSON body: {"user_ids": [...], "k": .., plus the rule fields}."""
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
        raise BadRequest(f"unknown field {_shown(unknown[0])}; use user_ids, {', '.join(QUERY_PARAMS)}")
    ids = doc.get("user_ids")
    if not isinstance(ids, list) or not ids:
        raise BadRequest("user_ids must be a non-empty list of user ids")
    if len(ids) > MAX_BATCH:
        raise BadRequest(f"user_ids has {len(ids)} ids; send at most {MAX_BATCH} per request")
    lists = {name: _list(doc.get(name), name) for name in ("exclude", "category", "exclude_category", "boost")}
    boosts = []
    for b in lists["boost"]:
        if not isinstance(b, dict) or set(b) != {"attribute", "value", "weight"}:
            raise BadRequest("each boost must be an object with attribute, value and weight")
        boosts.append(_boost(b["attribute"], b["value"], b["weight"]))
    for name in ("price_min", "price_max", "max_per_category"):
        if isinstance(doc.get(name), str):  # a query string's values are text; a JSON body's are numbers
            raise BadRequest(f"{name} must be a finite number, not a string")
    rules = _rules(exclude=lists["exclude"], categories=lists["category"],
                   exclude_categories=lists["exclude_category"], price_min=doc.get("price_min"),
                   price_max=doc.get("price_max"), max_per_category=doc.get("max_per_category"), boost=boosts)
    query = Query(k=parse_k(doc["k"], top_k) if doc.get("k") is not None else top_k, rules=rules)
    return [parse_user_id(u) for u in ids], query


def _list(value: Any, name: str) -> list:
    """A body field that takes a list; `category` alone may also be one string."""
    if value is None:
        return []
    if name == "category" and isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise BadRequest(f"{name} must be a list" + (" of item ids" if name == "exclude" else ""))
    if len(value) > (MAX_EXCLUDE if name == "exclude" else MAX_REPEAT):
        raise BadRequest(f"{name} has {len(value)} entries; send at most "
                         f"{MAX_EXCLUDE if name == 'exclude' else MAX_REPEAT}")
    return value


def _candidates(pairs: Iterable[tuple[str, float]], unavailable: Any) -> list[tuple[str, float]]:
    return [(i, s) for i, s in pairs if i not in unavailable]


def published(value: bytes, query: Query, unavailable: Any, meta: Mapping[str, dict]) -> dict:
    """The answer for a user with a published list: that record, its items filtered by
    availability and the request's rules, then cut to k."""
    record = orjson.loads(value)
    by_id = {i.get("item_id"): i for i in record.get("items", ()) if isinstance(i, dict)}
    pairs = _candidates(((i, float(v.get("score", 0.0))) for i, v in by_id.items()), unavailable)
    kept = apply(pairs, query.rules, meta, query.k)
    items = [{**by_id[i], "score": round(s, 6)} for i, s in kept]
    return {**record, "items": items, "schema_version": record.get("schema_version", SCHEMA_VERSION),
            "source": "published", "k": query.k, "complete": len(items) == query.k}


def fallback(user_id: str, query: Query, popular: list[tuple[str, float]], version: str,
             unavailable: Any, meta: Mapping[str, dict], reasons: bool = True) -> dict:
    """The answer for a user with no published list: the most popular items that pass."""
    kept = apply(_candidates(((i, float(s)) for i, s in popular), unavailable), query.rules, meta, query.k)
    items = [{"item_id": i, "score": round(s, 6), **({"reason": "fallback"} if reasons else {})} for i, s in kept]
    return {"user_id": user_id, "items": items, "model_version": version, "variant": "default",
            "generated_at": round(time.time(), 3), "schema_version": SCHEMA_VERSION, "source": "fallback",
            "k": query.k, "complete": len(items) == query.k}


def pool_size(query: Query, unavailable_count: int) -> int:
    """How many popular items a fallback needs to look through to fill `k`."""
    r = query.rules
    if r.categories or r.exclude_categories or r.price_min is not None or r.price_max is not None \
            or r.max_per_category or r.boost:
        return FALLBACK_POOL
    return min(FALLBACK_POOL, max(100, query.k + len(r.exclude) + unavailable_count))


def error(message: str) -> dict:
    return {"error": message}
