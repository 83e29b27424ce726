"""Training/evaluation data: load JSONL events or `pairs`, leave-one-out splits, fingerprint.

Leave-one-out follows the SASRec protocol so numbers compare with the literature: per user
with >= 3 item interactions, the last item event is test, the second-last validation, the
rest train. Searches and dismisses are context tokens only, never targets.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from model.event_types import positive
from model.features import EVENT_TYPES, RawEvent
from stream_app.errors import UserError

FORMATS = ("auto", "jsonl", "pairs")


@dataclass
class Dataset:
    users: list[str]
    histories: list[list[RawEvent]]          # time-ordered per user
    items: list[str]                         # every item id seen, first-appearance order
    catalog: dict[str, dict] | None = None
    fingerprint: str = ""
    path: str = ""
    format: str = ""
    skipped: int = 0

    @property
    def n_interactions(self) -> int:
        return sum(sum(1 for e in h if positive(e.item_id, e.type)) for h in self.histories)


@dataclass
class Split:
    user: int
    context: list[RawEvent]   # everything before the held-out event
    target: str
    seen: set[str] = field(default_factory=set)  # all items the user ever interacted with


def fingerprint(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return "sha256:" + h.hexdigest()[:16]


def _ts(v: Any) -> float:
    if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
        return float(v)
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            dt = datetime.fromisoformat(v.strip().replace("Z", "+00:00"))
            return (dt if dt.tzinfo else dt.replace(tzinfo=timezone.utc)).timestamp()
    raise ValueError("bad ts")


def open_text(path: str, errors: str = "strict"):
    """A data file for reading as text; `.gz` files are decompressed on the fly."""
    if path.endswith(".gz"):
        return gzip.open(path, "rt", encoding="utf-8", errors=errors)
    return open(path, encoding="utf-8", errors=errors)


def detect_format(path: str) -> str:
    with open_text(path, errors="replace") as f:
        for line in f:
            if line.strip():
                return "jsonl" if line.lstrip().startswith("{") else "pairs"
    raise UserError(f"{path} is empty; pass a JSONL event file or a `user item` pairs file")


def load_catalog(path: str | None) -> dict[str, dict] | None:
    if not path:
        return None
    if not os.path.isfile(path):
        raise UserError(f"catalog file {path} not found; pass --catalog FILE with JSONL rows {{item_id,title,category}}")
    out: dict[str, dict] = {}
    with open_text(path) as f:
        for line in f:
            try:
                row = json.loads(line)
                price, attributes = row.get("price"), row.get("attributes")
                out[str(row["item_id"])] = {  # what content vectors and rules (model/rules.py) read
                    "title": row.get("title"), "category": row.get("category"),
                    "price": float(price) if isinstance(price, (int, float)) and not isinstance(price, bool) else None,
                    "attributes": attributes if isinstance(attributes, dict) else {}}
            except (ValueError, KeyError, TypeError):
                continue
    if not out:
        raise UserError(f"catalog {path} has no valid rows; each line must be JSON with item_id, title, category")
    return out


def parse_event_line(line: str) -> tuple[str, RawEvent] | None:
    """(user_id, event) of one JSONL event line; None if it is not a usable event."""
    try:
        o = json.loads(line)
        etype = o.get("type") or "click"
        if etype not in EVENT_TYPES:
            raise ValueError(etype)
        item = o.get("item_id")
        if etype != "search" and not item:
            raise ValueError("item")
        ts = _ts(o.get("ts", 0.0))
        return str(o["user_id"]), RawEvent(str(item) if item is not None and etype != "search" else None, etype, ts,
                                           o.get("query") if etype == "search" else None)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def load(path: str, fmt: str = "auto", catalog: str | None = None) -> Dataset:
    """Parse a data file into time-ordered per-user raw histories."""
    if not path or not os.path.isfile(path):
        raise UserError(f"data file {path!r} not found; pass --data PATH (JSONL events or `user item` pairs)")
    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of jsonl, pairs")
    fmt = detect_format(path) if fmt == "auto" else fmt
    per_user: dict[str, list[tuple[float, int, RawEvent]]] = {}
    skipped = 0
    with open_text(path, errors="replace") as f:
        for n, line in enumerate(f):
            if not line.strip():
                continue
            if fmt == "pairs":
                parts = line.split()
                if len(parts) < 2 or line.lstrip().startswith("{"):
                    skipped += 1
                    continue
                per_user.setdefault(parts[0], []).append((0.0, n, RawEvent(parts[1], "click", 0.0, None)))
                continue
            parsed = parse_event_line(line)
            if parsed is None:
                skipped += 1
                continue
            per_user.setdefault(parsed[0], []).append((parsed[1].ts, n, parsed[1]))
    if not per_user:
        raise UserError(f"no valid {fmt} records in {path}; check --format (jsonl or pairs)")
    users = list(per_user)
    histories = [[e for _, _, e in sorted(per_user[u], key=lambda r: (r[0], r[1]))] for u in users]
    seen: dict[str, None] = {}
    for h in histories:
        for e in h:
            if e.item_id is not None:
                seen.setdefault(e.item_id)
    return Dataset(users, histories, list(seen), load_catalog(catalog), fingerprint(path), path, fmt, skipped)


def leave_one_out(ds: Dataset) -> tuple[list[list[RawEvent]], list[Split], list[Split]]:
    """(train histories, validation splits, test splits).

    Train history = events before the validation item; users with < 3 item interactions
    train on everything and are not evaluated.
    """
    train, valid, test = [], [], []
    for u, h in enumerate(ds.histories):
        pos = [i for i, e in enumerate(h) if positive(e.item_id, e.type)]  # a dismiss is never held out
        if len(pos) < 3:
            train.append(h)
            continue
        seen = {h[i].item_id for i in pos}
        train.append(h[: pos[-2]])
        valid.append(Split(u, h[: pos[-2]], h[pos[-2]].item_id, seen))
        test.append(Split(u, h[: pos[-1]], h[pos[-1]].item_id, seen))
    return train, valid, test
