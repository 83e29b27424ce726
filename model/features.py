"""Raw events -> integer model inputs. The only place tokenization happens.

Why here and not in the stream processor: state stores the raw history (docs/design.md,
"History is state, caches are derived"), so a new checkpoint with a different vocabulary
or hashing never invalidates state, only caches. Hashing uses crc32 (not Python's salted `hash`) so every process agrees.
"""
from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

import torch

from model.config import ModelConfig
from model.event_types import EVENT_TYPES, TYPE_ID, positive  # noqa: F401 (EVENT_TYPES: re-exported)
_WORD = re.compile(r"[a-z0-9]+")


@dataclass(frozen=True, slots=True)
class RawEvent:
    """One stored event, exactly what the state table keeps for a user."""
    item_id: str | None
    type: str = "click"
    ts: float = 0.0
    query: str | None = None

    @classmethod
    def coerce(cls, e: Any) -> "RawEvent":
        """Accept a RawEvent, a dict, or any object with the contract's field names."""
        if isinstance(e, RawEvent):
            return e
        get = e.get if isinstance(e, Mapping) else (lambda k, d=None: getattr(e, k, d))
        return cls(get("item_id"), get("type", "click") or "click", float(get("ts", 0.0) or 0.0), get("query"))


def item_ids(events: Iterable[Any]) -> list[str]:
    """Item ids of the events that took an item (model/event_types.py, POSITIVE), oldest
    first: searches carry none, and a dismissed item is not one the user went on from."""
    out = []
    for e in events:
        e = RawEvent.coerce(e)
        if positive(e.item_id, e.type):
            out.append(e.item_id)
    return out


def stable_hash(token: str, buckets: int) -> int:
    """Bucket in 1..buckets-1 (0 is padding)."""
    return 1 + zlib.crc32(token.encode("utf-8")) % (buckets - 1)


def content_tokens(meta: Mapping[str, Any] | None, cfg: ModelConfig) -> list[int]:
    """Hashed title words and category (whole path and its parts): unseen items still get a vector."""
    if not meta:
        return []
    toks: list[str] = []
    cat = str(meta.get("category") or "").lower().strip()
    if cat:
        toks.append("c:" + cat)
        toks += ["cp:" + p.strip() for p in re.split(r"[>/|]", cat) if p.strip() and p.strip() != cat]
    toks += ["t:" + w for w in _WORD.findall(str(meta.get("title") or "").lower())]
    return [stable_hash(t, cfg.content_buckets) for t in toks[: cfg.max_content_tokens]]


def query_ngrams(query: str | None, cfg: ModelConfig) -> list[int]:
    """Character n-grams survive typos and unseen words, unlike a word vocabulary."""
    if not query:
        return []
    q = " " + " ".join(_WORD.findall(query.lower())) + " "
    grams = [q[i : i + cfg.ngram] for i in range(max(1, len(q) - cfg.ngram + 1))]
    return [stable_hash("q:" + g, cfg.query_buckets) for g in grams[: cfg.max_query_ngrams]]


def gap_bucket(ts: float, prev_ts: float | None, cfg: ModelConfig) -> int:
    """Log-bucketed seconds since the previous event; depends on that one event only."""
    if prev_ts is None or not ts or not prev_ts:
        return 0
    gap = max(0.0, ts - prev_ts)
    return min(cfg.gap_buckets - 1, 1 + int(math.log2(1.0 + gap)))


class ItemIndex:
    """Item vocabulary that can grow at serve time.

    Index 0 is OOV/padding. Indices 1..n_trained have learned ID embeddings; items added
    later (catalog upserts) share the zero OOV ID row and are represented by content only.
    """

    def __init__(self, item_ids: Sequence[str], cfg: ModelConfig, catalog: Mapping[str, Mapping] | None = None) -> None:
        self.cfg = cfg
        self.ids: list[str] = [""]
        self.index: dict[str, int] = {}
        self.meta: dict[str, dict] = {}
        self._content: list[list[int]] = [[]]
        self.n_trained = len(item_ids)
        self._width = 1  # widest content row so far
        # Every add() bumps `version` and logs the index it touched, so derived tensors (the
        # token table here, the item matrix in ItemScorer) patch the changed rows instead of
        # recomputing a million-item catalog on each upsert.
        self.version = 0
        self._log: list[int] = []
        self._log_base = 0  # version of _log[0]
        self._tensors: tuple[int, torch.Tensor, torch.Tensor] | None = None
        for iid in item_ids:
            self.add(iid, (catalog or {}).get(iid))
        self.n_trained = len(self.ids) - 1
        for iid, m in (catalog or {}).items():  # catalog items never seen in training
            if iid not in self.index:
                self.add(iid, m)

    def __len__(self) -> int:
        return len(self.ids)

    def add(self, item_id: str, meta: Mapping[str, Any] | None = None) -> int:
        """Insert or update an item; returns its index. Content updates change its vector."""
        idx = self.index.get(item_id)
        known = idx is not None
        if meta is not None:
            self.meta[item_id] = {"title": meta.get("title"), "category": meta.get("category")}
        if idx is None:
            idx = len(self.ids)
            self.ids.append(item_id)
            self.index[item_id] = idx
            self._content.append([])
        tokens = content_tokens(self.meta.get(item_id), self.cfg)
        if known and tokens == self._content[idx]:
            return idx  # nothing derived changes: a re-attached catalog must not re-score every row
        self._content[idx] = tokens
        self._width = max(self._width, len(tokens))
        self._log.append(idx)
        self.version += 1
        if len(self._log) > 100_000:  # readers further behind than this rebuild everything
            self._log_base, self._log = self.version, []
        return idx

    def changed_since(self, version: int) -> list[int] | None:
        """Indices added or updated after `version` (repeats possible); None: too old, rebuild."""
        start = version - self._log_base
        return None if start < 0 else self._log[start:]

    def lookup(self, item_id: str | None) -> int:
        return self.index.get(item_id, 0) if item_id is not None else 0

    @property
    def has_content(self) -> bool:
        return bool(self.meta)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(id_row [N], content token ids [N, C]) for every index, patched in place on upserts."""
        cached = self._tensors
        if cached is not None and cached[0] == self.version:
            return cached[1], cached[2]
        changed = None if cached is None else self.changed_since(cached[0])
        if changed is None or cached[2].shape[1] < self._width:
            id_row = torch.arange(len(self.ids))
            id_row[self.n_trained + 1 :] = 0
            content = torch.zeros(len(self.ids), self._width, dtype=torch.long)
            self._write_content(content, range(1, len(self.ids)))
        else:  # items added at serve time have no trained ID row: new rows stay 0
            id_row, content = with_room(cached[1], len(self.ids)), with_room(cached[2], len(self.ids))
            self._write_content(content, sorted(set(changed)))
        n = len(self.ids)
        self._tensors = (self.version, id_row[:n], content[:n])
        return id_row[:n], content[:n]

    def _write_content(self, content: torch.Tensor, indices) -> None:
        indices = list(indices)
        if indices:
            width = content.shape[1]
            rows = [(c := self._content[i]) + [0] * (width - len(c)) for i in indices]
            content[torch.tensor(indices)] = torch.tensor(rows, dtype=content.dtype)


def with_room(t: torch.Tensor, rows: int) -> torch.Tensor:
    """`t`, or a copy with spare rows (zeros) when it has fewer than `rows`: growing by a
    quarter at a time keeps one-item catalog upserts from copying a 1M-row table each."""
    base = t._base if t._base is not None else t  # views handed out keep their spare rows
    if base.shape[0] >= rows:
        return base
    grown = base.new_zeros((max(rows, base.shape[0] * 5 // 4 + 1024), *base.shape[1:]))
    grown[: base.shape[0]] = base
    return grown


@dataclass
class Batch:
    """Left-padded token batch; padding is contiguous on the left so relative distances hold."""
    item: torch.Tensor    # [B, T] ItemIndex indices (0 = none/OOV)
    etype: torch.Tensor   # [B, T]
    gap: torch.Tensor     # [B, T]
    qidx: torch.Tensor    # [B, T] row in `qtok` (0 = no query)
    qtok: torch.Tensor    # [Nq + 1, Q] hashed n-grams, row 0 empty
    valid: torch.Tensor   # [B, T] bool

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(*(getattr(self, f).to(device) for f in ("item", "etype", "gap", "qidx", "qtok", "valid")))


def encode(
    histories: Sequence[Sequence[Any]],
    items: ItemIndex,
    max_len: int | None = None,
    prev_ts: Sequence[float | None] | None = None,
) -> Batch:
    """Tokenize the last `max_len` events of each history (time gaps use the event before).

    `prev_ts[b]` is the timestamp of the event preceding history b (for one-event steps).
    """
    cfg = items.cfg
    B = len(histories)
    T = max(1, max((len(h) if max_len is None else min(len(h), max_len)) for h in histories) if B else 1)
    item = torch.zeros(B, T, dtype=torch.long)
    etype = torch.zeros(B, T, dtype=torch.long)
    gap = torch.zeros(B, T, dtype=torch.long)
    qidx = torch.zeros(B, T, dtype=torch.long)
    valid = torch.zeros(B, T, dtype=torch.bool)
    queries: list[list[int]] = [[]]
    qrow: dict[str, int] = {}
    rows_i, rows_t, rows_g, rows_q, bs, ts_ = [], [], [], [], [], []
    for b, hist in enumerate(histories):
        n = len(hist) if max_len is None else min(len(hist), max_len)
        start = len(hist) - n
        prev = (prev_ts[b] if prev_ts is not None else None)
        if start > 0:
            prev = RawEvent.coerce(hist[start - 1]).ts
        for j in range(n):
            e = RawEvent.coerce(hist[start + j])
            rows_i.append(items.lookup(e.item_id) if e.type != "search" else 0)
            rows_t.append(TYPE_ID.get(e.type, 1))
            rows_g.append(gap_bucket(e.ts, prev, cfg))
            q = 0
            if e.type == "search" and e.query:
                q = qrow.get(e.query, 0)
                if not q:
                    q = qrow[e.query] = len(queries)
                    queries.append(query_ngrams(e.query, cfg))
            rows_q.append(q)
            bs.append(b)
            ts_.append(T - n + j)
            prev = e.ts
    if bs:
        bi, ti = torch.tensor(bs), torch.tensor(ts_)
        item[bi, ti] = torch.tensor(rows_i)
        etype[bi, ti] = torch.tensor(rows_t)
        gap[bi, ti] = torch.tensor(rows_g)
        qidx[bi, ti] = torch.tensor(rows_q)
        valid[bi, ti] = True
    width = max(1, max(len(q) for q in queries))
    qtok = torch.zeros(len(queries), width, dtype=torch.long)
    for i, q in enumerate(queries):
        if q:
            qtok[i, : len(q)] = torch.tensor(q)
    return Batch(item, etype, gap, qidx, qtok, valid)


def last_ts(histories: Iterable[Sequence[Any]]) -> list[float | None]:
    return [RawEvent.coerce(h[-1]).ts if len(h) else None for h in histories]
