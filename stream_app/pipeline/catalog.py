"""The item catalog, from the compacted `catalog.items` topic.

Every worker needs the whole catalog (any user may be recommended any item), so it is
read without a consumer group, all partitions, from the beginning; compaction keeps
that read short. An upsert adds the item to each served model's ItemIndex (a new item
gets a content-only vector, recommendable at once) and availability masks scoring.

Because the topic is compacted and replayed at every start, one record that crashes the
worker crashes it at every start too. So `Catalog.apply` never raises for a record (only
MemoryError, which no record can be blamed for, propagates): a record that breaks the
contract (docs/contracts.md, "Catalog item") is rejected with one reason from `REASONS`,
counted in `streamrec_catalog_rejected_total{reason}` and logged at most once per reason
per `log_interval_s`, and the item it is keyed by is withdrawn (fail closed) until a valid
record for it arrives.
"""
from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, AsyncIterable, Awaitable, Callable

import orjson
import torch

from stream_app import metrics

log = logging.getLogger(__name__)

# Closed set of rejection reasons (metric label values; the DLQ reason header once wired).
REASONS = (
    "too_large",       # key or value over its byte cap; not parsed at all
    "invalid_utf8",    # not UTF-8, or a lone surrogate (no UTF-8 key or record can carry it)
    "invalid_json",    # not JSON, NaN/Infinity, a number no double holds, or nested too deep
    "not_object",      # valid JSON but not an object (a list, a number, null, ...)
    "missing_field",   # no key: the key of a catalog record is its item_id
    "wrong_type",      # item_id, title or category that is not a string
    "empty_field",     # key or item_id empty after stripping
    "field_too_long",  # item_id, title or category over its limit
    "key_mismatch",    # the value's item_id is not the key
    "bad_price",       # price not a finite number (or null / absent)
    "bad_available",   # available not a JSON boolean (or absent)
    "bad_attributes",  # attributes not an object of at most 32 short names -> string, number or boolean
    "internal",        # anything else raised while applying one record (a bug, not the record)
)
for _r in REASONS:  # export zeros so dashboards and alerts see every series from the start
    metrics.CATALOG_REJECTED.labels(_r)

MAX_VALUE_BYTES = 65_536
MAX_KEY_BYTES = 512  # 128 characters of up to 4 UTF-8 bytes: any item_id an event may carry
MAX_LEN = {"item_id": 128, "title": 1024, "category": 256}  # characters; item_id as for events
MAX_ATTRIBUTES, MAX_ATTRIBUTE_NAME, MAX_ATTRIBUTE_VALUE = 32, 64, 256  # what rules may boost or bury by

OnReject = Callable[[Any, Any, str], Awaitable[None]]  # (key, value, reason)


class Rejected(Exception):
    """A record that breaks the catalog contract: a reason from REASONS and a detail.

    `item_id` is the record's key when the key itself was valid: that item is withdrawn."""

    def __init__(self, reason: str, detail: str = "", item_id: str | None = None) -> None:
        assert reason in REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason, self.detail, self.item_id = reason, _safe(detail), item_id


@dataclass(frozen=True, slots=True)
class Item:
    """One valid catalog record. `meta` is None for a tombstone (only availability changes)."""

    item_id: str
    meta: dict[str, Any] | None
    available: bool


def _safe(text: str, limit: int = 200) -> str:
    """Text fit for a log line or a DLQ header: bounded, and a lone surrogate escaped
    (logging or encoding it must never be what fails)."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")


def _text(value: Any, field: str, item_id: str | None, strip: bool = False) -> str:
    """A string field as the contract wants it: str, encodable as strict UTF-8, within MAX_LEN."""
    if not isinstance(value, str):
        raise Rejected("wrong_type", f"{field} must be a string, got {type(value).__name__}", item_id)
    if not value.isascii():
        try:  # orjson and strict decoding both refuse lone surrogates already; this is the
            value.encode("utf-8")  # contract itself, so no other path can let one through
        except UnicodeEncodeError:
            raise Rejected("invalid_utf8", f"{field} holds a lone surrogate", item_id) from None
    if strip:
        value = value.strip()
    if len(value) > MAX_LEN[field]:
        raise Rejected("field_too_long", f"{field} longer than {MAX_LEN[field]} characters", item_id)
    return value


def _key_item_id(key: Any, max_key_bytes: int) -> str:
    if key is None or not isinstance(key, (bytes, bytearray, memoryview)) or not len(key):
        raise Rejected("missing_field", "no key: a catalog record is keyed by its item_id")
    if len(key) > max_key_bytes:
        raise Rejected("too_large", f"key of {len(key)} bytes > {max_key_bytes}")
    try:
        text = bytes(key).decode("utf-8")  # strict: encoded surrogates (ED A0 80) are refused too
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"key {bytes(key)[:40]!r}: {exc.reason}") from None
    item_id = _text(text, "item_id", None, strip=True)
    if not item_id:
        raise Rejected("empty_field", "key is empty after stripping")
    return item_id


def _load(value: bytes, item_id: str) -> Any:
    """JSON without recursion: orjson's parser (Rust) stops at 1,024 levels with a
    JSONDecodeError, so 5,000 or 100,000 nested brackets are an ordinary rejection. The
    stdlib parser, which recurses and raises RecursionError, is never used here: everything
    orjson refuses (lone surrogates, NaN, numbers no double holds, invalid UTF-8) is
    rejected by the contract anyway, so orjson's verdict only needs a reason."""
    try:
        return orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        msg = str(exc)
    except RecursionError:  # not raised by orjson; kept so no future parser change can crash a worker
        raise Rejected("invalid_json", "nested too deep", item_id) from None
    try:
        bytes(value).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise Rejected("invalid_utf8", f"value: {exc.reason} at byte {exc.start}", item_id) from None
    reason = "invalid_utf8" if "surrogate" in msg else "invalid_json"  # a "\ud800" escape
    raise Rejected(reason, msg, item_id)


def parse_record(key: Any, value: Any, max_key_bytes: int = MAX_KEY_BYTES,
                 max_value_bytes: int = MAX_VALUE_BYTES) -> Item:
    """Bytes off the wire -> a valid Item, or Rejected(reason). Caps come before parsing
    so a huge record costs nothing but its length check."""
    item_id = _key_item_id(key, max_key_bytes)
    if value is None or (isinstance(value, (bytes, bytearray, memoryview)) and not len(value)):
        return Item(item_id, None, False)  # tombstone (an empty value counts as one)
    if not isinstance(value, (bytes, bytearray, memoryview)):
        raise Rejected("wrong_type", f"value is {type(value).__name__}, not bytes", item_id)
    if len(value) > max_value_bytes:
        raise Rejected("too_large", f"value of {len(value)} bytes > {max_value_bytes}", item_id)
    record = _load(value, item_id)
    if not isinstance(record, dict):
        raise Rejected("not_object", f"top-level JSON is {type(record).__name__}", item_id)
    own = record.get("item_id")
    if own is not None:
        own = _text(own, "item_id", item_id, strip=True)
        if not own:
            raise Rejected("empty_field", "item_id is empty after stripping", item_id)
        if own != item_id:  # compaction and tombstones work per key: another id would outlive them
            raise Rejected("key_mismatch", f"item_id {own[:40]!r} is not the key {item_id[:40]!r}", item_id)
    title, category = ("" if record.get(f) is None else _text(record[f], f, item_id) for f in ("title", "category"))
    price = record.get("price")
    if price is not None:
        if isinstance(price, bool) or not isinstance(price, (int, float)):
            raise Rejected("bad_price", f"price must be a number, got {type(price).__name__}", item_id)
        try:
            price = float(price)
        except OverflowError:
            raise Rejected("bad_price", "price integer too large", item_id) from None
        if not math.isfinite(price):
            raise Rejected("bad_price", f"price {price!r} is not finite", item_id)
    available = record.get("available", True)
    if not isinstance(available, bool):  # "false", 0, null: guessing would keep a withdrawn item served
        shown = repr(available[:20]) if isinstance(available, str) else type(available).__name__
        raise Rejected("bad_available", f"available must be true or false, got {shown}", item_id)
    attributes = _attributes(record.get("attributes"), item_id)
    return Item(item_id, {"title": title, "category": category, "price": price, "attributes": attributes}, available)


def _attributes(value: Any, item_id: str) -> dict[str, str | float | bool]:
    """The optional `attributes` object: flat, bounded, names and values a rule can match
    (model/rules.py `Boost`). Nulls are dropped; anything nested is refused."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Rejected("bad_attributes", f"attributes must be an object, got {type(value).__name__}", item_id)
    if len(value) > MAX_ATTRIBUTES:
        raise Rejected("bad_attributes", f"{len(value)} attributes > {MAX_ATTRIBUTES}", item_id)
    out: dict[str, str | float | bool] = {}
    for name, v in value.items():
        if not name.strip() or len(name) > MAX_ATTRIBUTE_NAME or not _utf8(name):
            raise Rejected("bad_attributes", f"attribute name {name[:40]!r} is empty, over "
                           f"{MAX_ATTRIBUTE_NAME} characters or not UTF-8", item_id)
        if v is None:
            continue
        if isinstance(v, bool):
            out[name] = v
        elif isinstance(v, (int, float)):
            try:
                f = float(v)
            except OverflowError:
                f = math.inf
            if not math.isfinite(f):
                raise Rejected("bad_attributes", f"attribute {name[:40]!r} is not a finite number", item_id)
            out[name] = f
        elif isinstance(v, str):
            if len(v) > MAX_ATTRIBUTE_VALUE or not _utf8(v):
                raise Rejected("bad_attributes", f"attribute {name[:40]!r} is over {MAX_ATTRIBUTE_VALUE} "
                               "characters or not UTF-8", item_id)
            out[name] = v
        else:
            raise Rejected("bad_attributes", f"attribute {name[:40]!r} is a {type(v).__name__}; use a string, "
                           "number or boolean", item_id)
    return out


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


class Throttle:
    """One warning line per reason per interval, with how many were suppressed: a flood of
    10,000 hostile records (replayed at every start) must not become 10,000 lines. Shared by
    every compacted topic a worker replays (the catalog, trending snapshots)."""

    def __init__(self, interval_s: float, clock: Callable[[], float], logger: logging.Logger = log) -> None:
        self.interval_s, self.clock, self.log = interval_s, clock, logger
        self._next: dict[str, float] = {}
        self._suppressed: Counter[str] = Counter()

    def warn(self, reason: str, msg: str, exc_info: BaseException | None = None) -> None:
        now = self.clock()
        if now < self._next.get(reason, -math.inf):
            self._suppressed[reason] += 1
            return
        self._next[reason] = now + self.interval_s
        more = self._suppressed.pop(reason, 0)
        self.log.warning("%s%s", msg, f" ({more} more since the last such line)" if more else "", exc_info=exc_info)


class Catalog:
    """Item metadata and availability as the catalog topic has them, shared by the served
    models (attach/detach) and the fallback; mutated only in the event loop."""

    def __init__(self, max_value_bytes: int = MAX_VALUE_BYTES, max_key_bytes: int = MAX_KEY_BYTES,
                 log_interval_s: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.meta: dict[str, dict] = {}
        # Mutated in place (readers see it at once); `_version` tells caches it changed.
        self.unavailable: set[str] = set()
        self._version = 0
        self._blocked_known = 0  # items in both meta and unavailable: the gauges without an O(n) scan
        self._indices: list = []  # ItemIndex objects of served models
        self._blocked: dict[int, tuple[int, int, torch.Tensor]] = {}
        self.max_value_bytes, self.max_key_bytes = max_value_bytes, max_key_bytes
        self._throttle = Throttle(log_interval_s, clock)
        self.last_reason: str | None = None  # why the last apply() returned False (None: applied)
        self.last_detail: str | None = None
        # set once every record that was on the topic when the worker started is applied:
        # the agent serves no event before, so a withdrawn item is never recommended by a
        # worker that has not yet re-read its withdrawal (docs/design.md, "Catalog before events")
        self.loaded = asyncio.Event()

    def attach(self, items: Any) -> None:
        """Register a served model's ItemIndex and bring it up to date."""
        self._indices.append(items)
        for item_id, meta in self.meta.items():
            items.add(item_id, meta)

    def detach(self, items: Any) -> None:
        self._indices = [i for i in self._indices if i is not items]

    def apply(self, key: bytes | None, value: bytes | None) -> bool:
        """One catalog record; True if applied. A tombstone (no value) makes the item
        unavailable. Never raises for a record: False, with `last_reason` / `last_detail`
        set, for a rejected one (see the module docstring). MemoryError propagates."""
        self.last_reason = self.last_detail = None
        item_id = None
        try:
            item = parse_record(key, value, self.max_key_bytes, self.max_value_bytes)
            item_id = item.item_id
            self._upsert(item)
            return True
        except Rejected as exc:
            self._reject(exc.reason, exc.detail, exc.item_id)
        except MemoryError:
            raise
        except Exception as exc:  # one record must not take the catalog task (and the worker) down
            self._reject("internal", _safe(f"{type(exc).__name__}: {exc}"), item_id, exc)
        return False

    def _upsert(self, item: Item) -> None:
        if item.meta is not None:
            if item.item_id not in self.meta and item.item_id in self.unavailable:
                self._blocked_known += 1
            self.meta[item.item_id] = item.meta
            for items in self._indices:
                items.add(item.item_id, item.meta)
        self._set_available(item.item_id, item.available)
        self._export()

    def _export(self) -> None:
        metrics.CATALOG_ITEMS.labels("available").set(len(self.meta) - self._blocked_known)
        metrics.CATALOG_ITEMS.labels("unavailable").set(len(self.unavailable))

    def _set_available(self, item_id: str, available: bool) -> None:
        if available == (item_id not in self.unavailable):
            return
        (self.unavailable.discard if available else self.unavailable.add)(item_id)
        self._version += 1
        if item_id in self.meta:
            self._blocked_known += -1 if available else 1

    def _reject(self, reason: str, detail: str, item_id: str | None, exc: BaseException | None = None) -> None:
        """Count, log (throttled) and fail closed: the record's item is withdrawn, so what a
        worker serves is the same before and after compaction drops the item's older records."""
        self.last_reason, self.last_detail = reason, detail
        metrics.CATALOG_REJECTED.labels(reason).inc()
        if item_id is not None:
            try:
                self._set_available(item_id, False)
                self._export()
            except MemoryError:
                raise
            except Exception:  # an internal error may have come from here; still never raise
                pass
        shown = f"item {item_id[:40]!r}" if item_id is not None else "record"
        self._throttle.warn(reason, f"catalog {shown} rejected ({reason}): {detail}", exc)

    def note_callback_failure(self, exc: BaseException) -> None:
        """on_reject raised (e.g. the dead-letter send failed): logged, throttled, never fatal."""
        self._throttle.warn("on_reject", _safe(f"catalog on_reject failed: {type(exc).__name__}: {exc}"), exc)

    def blocked_indices(self, items: Any) -> torch.Tensor:
        """Indices of unavailable items in `items`, cached until either changes."""
        cached = self._blocked.get(id(items))
        if cached is None or cached[0] != len(items) or cached[1] != self._version:
            idx = [i for i in map(items.lookup, self.unavailable) if i]
            cached = (len(items), self._version, torch.tensor(idx, dtype=torch.long))
            self._blocked[id(items)] = cached
        return cached[2]


async def apply_all(catalog: Catalog, records: AsyncIterable[Any], on_reject: OnReject | None = None,
                    ends: dict[int, int] | None = None) -> None:
    """Apply each record (anything with `.key` and `.value`); a rejected one goes to
    `on_reject(key, value, reason)`, awaited in order, whose failure is logged and never
    stops the loop. Yields to the event loop every 1,000 records, so replaying a large
    catalog at start does not stall the agent. `ends`: partition -> end offset at start;
    `catalog.loaded` is set once every partition has been read up to it."""
    pending = {p: end for p, end in (ends or {}).items() if end > 0}
    if not pending:
        catalog.loaded.set()
    n = 0
    async for record in records:
        n += 1
        if n % 1000 == 0:
            await asyncio.sleep(0)
        applied = catalog.apply(record.key, record.value)
        if pending and record.offset + 1 >= pending.get(record.partition, 0):
            pending.pop(record.partition, None)
            if not pending:
                catalog.loaded.set()
        if applied or on_reject is None:
            continue
        try:
            await on_reject(record.key, record.value, catalog.last_reason or "internal")
        except MemoryError:
            raise
        except Exception as exc:
            catalog.note_callback_failure(exc)


async def follow(catalog: Catalog, bootstrap: str, topic: str, options: dict[str, Any] | None = None,
                 on_reject: OnReject | None = None) -> None:
    """Apply every record of the catalog topic, forever (an app task).

    `options`: security arguments from stream_app.transport.security.aiokafka_options.
    `on_reject`: optional async callback (key, value, reason) for each rejected record, e.g.
    a dead-letter send; the compacted topic replays rejected records at every start, so it
    sees them again after each restart."""
    from stream_app.transport.readers import whole_topic

    consumer, tps = await whole_topic(bootstrap, topic, options)
    try:
        await consumer.seek_to_beginning(*tps)
        ends = {tp.partition: end for tp, end in (await consumer.end_offsets(tps)).items()} if tps else {}
        await apply_all(catalog, consumer, on_reject, ends)
    finally:
        await consumer.stop()
