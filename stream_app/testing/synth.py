"""Synthetic clickstream with learnable structure, so models can be tested without real data.

Random events would make every recommender look equally bad. This world model plants the
signals a sequential recommender should find, each one checkable by a test:
  * Zipf item popularity (what a popularity baseline captures);
  * users with latent category interests that drift between sessions;
  * searches whose words come from the category's title vocabulary (char-n-gram models can
    link queries to items);
  * browse chains along a sparse per-item "successor" graph (what comes next depends on what
    came before, so a sequence model beats popularity);
  * a view -> click -> add_to_cart -> purchase funnel, purchases only of items in the cart;
  * now and then a dismiss of a popular item from a category the user cares little for
    (what a user says no to when a list shows it), drawn from a stream of its own so every
    other event is what it would be without dismisses;
  * seconds between events in a session, hours to days between sessions.
Output is deterministic for a seed (numpy PCG64; timestamps from a fixed 2026-01-01 base,
never the wall clock), so the same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import heapq
import json
import math
from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from model.event_types import EVENT_TYPES
from stream_app.errors import UserError

EXAMPLES = """examples:
  streamrec synth --users 1000 --items 2000 --events 100000 --out data/events.jsonl --catalog data/catalog.jsonl
  streamrec synth --users 6000 --items 3500 --events 300000 --seed 7 --format pairs --out data/train.txt
  streamrec synth --users 50 --items 200 --events 2000 --out /tmp/tiny.jsonl
"""

BASE_TS = 1_767_225_600  # 2026-01-01T00:00:00Z
SUCCESSORS = 3
SUCCESSOR_P = (0.5, 0.3, 0.2)
P_FOLLOW = 0.75  # browse follows the successor graph, else jumps by popularity
P_STAY = 0.6  # a jump stays in the current category, else samples the user's interests
P_SEARCH_START, P_SEARCH_MID = 0.5, 0.08
P_END = 0.14  # per browse step: session ends (mean ~7 views)
P_CLICK, P_CART, P_BUY = 0.35, 0.3, 0.45
P_DRIFT, DRIFT_WEIGHT = 0.15, 0.35
P_DISMISS = 0.05  # per view: a dismiss may follow it (~2% of events)

# category: "nouns | adjectives" (title vocabulary; queries draw their words from it)
VOCAB = {
    "audio": "headphones speaker earbuds soundbar microphone | wireless bluetooth stereo portable studio",
    "computing": "laptop keyboard mouse monitor webcam | mechanical ergonomic ultrawide compact backlit",
    "phones": "smartphone charger case cable powerbank | fast rugged slim magnetic braided",
    "kitchen": "blender kettle toaster skillet knife | electric cast-iron ceramic stainless nonstick",
    "home": "lamp pillow blanket curtain rug | cozy woven linen velvet scandinavian",
    "garden": "hose shovel planter sprinkler trimmer | cordless heavy-duty terracotta adjustable solar",
    "sports": "dumbbell yoga-mat treadmill racket football | foldable weighted pro-grade grippy padded",
    "outdoor": "tent backpack sleeping-bag lantern hammock | waterproof ultralight insulated camping trail",
    "fashion": "jacket sneakers dress scarf jeans | leather denim slim-fit knit vintage",
    "beauty": "shampoo serum lipstick moisturizer perfume | organic hydrating matte vegan floral",
    "toys": "puzzle robot doll blocks kite | wooden educational plush remote-control glow",
    "books": "novel cookbook atlas notebook biography | hardcover illustrated paperback pocket annotated",
    "grocery": "coffee tea chocolate olive-oil pasta | roasted fair-trade dark extra-virgin artisan",
    "pets": "leash litter kibble aquarium scratcher | catnip grain-free chewy orthopedic retractable",
    "baby": "stroller diaper bottle crib onesie | convertible hypoallergenic anti-colic swaddle cotton",
    "office": "stapler planner pen desk chair | gel-ink recycled standing swivel executive",
    "tools": "drill hammer wrench screwdriver saw | torque impact precision brushless magnetized",
    "auto": "dashcam tire wiper jumpstarter seat-cover | all-season heated universal led tinted",
    "health": "vitamins thermometer massager scale bandage | infrared protein herbal sterile clinical",
    "music": "guitar ukulele drumsticks amplifier piano | acoustic tuned beginner vintage-tone digital",
}
BRANDS = "Acme Globex Initech Umbrella Stark Hooli Vandelay Wonka Tyrell Cyberdyne Aperture Oscorp".split()
SYLLABLES = "ka lo mi ra ve zu no ti sa be do fy gra ple stro quin".split()


@dataclass
class World:
    """The catalog plus the hidden structure the event simulator uses (all index-based)."""

    rows: list[dict]
    item_cat: list[int]
    item_words: list[tuple[str, str]]  # (adjective, noun) of each title
    successors: list[list[int]]
    cat_items: list[list[int]]
    cat_cdf: list[list[float]]  # cumulative popularity within each category
    cat_weight: np.ndarray  # share of total popularity per category


class _Uniform:
    """Buffered U[0,1) draws: one numpy call per 8192 draws keeps the Python loop fast."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng, self.buf, self.i = rng, [], 0

    def __call__(self) -> float:
        if self.i >= len(self.buf):
            self.buf, self.i = self.rng.random(8192).tolist(), 0
        self.i += 1
        return self.buf[self.i - 1]

    def pick(self, cdf: list[float]) -> int:
        return min(bisect_right(cdf, self() * cdf[-1]), len(cdf) - 1)

    def expo(self, mean: float) -> float:
        return -math.log(1.0 - self()) * mean


def _rngs(seed: int) -> tuple[np.random.Generator, np.random.Generator, np.random.Generator]:
    """Independent streams for the catalog, the users and their dismisses: catalog() needs
    no users, and dismisses change no other event (a child does not depend on the count)."""
    return tuple(np.random.Generator(np.random.PCG64(s)) for s in np.random.SeedSequence(seed).spawn(3))


def _categories(n: int, rng: np.random.Generator) -> list[tuple[str, list[str], list[str]]]:
    """n categories: the 20 base ones, then variants with invented adjectives ("audio 2")."""
    base = list(VOCAB.items())
    out = []
    for c in range(n):
        name, words = base[c % len(base)]
        nouns, adjs = (part.split() for part in words.split("|"))
        if c >= len(base):
            name = f"{name} {c // len(base) + 1}"
            adjs = ["".join(rng.choice(SYLLABLES, 3)) for _ in range(len(adjs))]
        out.append((name, nouns, adjs))
    return out


def _world(items: int, seed: int) -> World:
    if items < 1:
        raise UserError("--items must be at least 1")
    rng = _rngs(seed)[0]
    n_cat = int(min(items, max(2, round(math.sqrt(items) * 0.6))))
    cats = _categories(n_cat, rng)
    item_cat = rng.integers(0, n_cat, items)
    item_cat[:n_cat] = np.arange(n_cat)  # no empty category
    pop = 1.0 / rng.permutation(np.arange(1, items + 1)) ** 1.05  # Zipf over a random rank order
    cat_price = np.exp(rng.uniform(math.log(5), math.log(300), n_cat))
    prices = cat_price[item_cat] * np.exp(rng.normal(0.0, 0.5, items))
    rows, words = [], []
    for i, c in enumerate(item_cat.tolist()):
        name, nouns, adjs = cats[c]
        adj, noun = adjs[rng.integers(len(adjs))], nouns[rng.integers(len(nouns))]
        title = f"{BRANDS[rng.integers(len(BRANDS))]} {adj} {noun} {rng.integers(1, 10)}"
        rows.append({"item_id": f"i{i}", "title": title, "category": name, "price": round(float(prices[i]), 2)})
        words.append((adj, noun))
    cat_items = [np.flatnonzero(item_cat == c) for c in range(n_cat)]
    successors: list[list[int]] = [[] for _ in range(items)]
    for members in cat_items:
        if len(members) < 2:
            continue
        picks = rng.integers(0, len(members) - 1, (len(members), SUCCESSORS))
        picks += picks >= np.arange(len(members))[:, None]  # never the item itself
        for own, row in zip(members.tolist(), members[picks].tolist()):
            successors[own] = row
    cat_pop = [pop[m] for m in cat_items]
    weight = np.array([p.sum() for p in cat_pop])
    return World(rows, item_cat.tolist(), words, successors, [m.tolist() for m in cat_items],
                 [np.cumsum(p).tolist() for p in cat_pop], weight / weight.sum())


def catalog(items: int, seed: int = 0) -> list[dict]:
    """Catalog rows {item_id, title, category, price}; the same as generate()'s for items/seed."""
    return _world(items, seed).rows


class _Users:
    """Per-user interests (cumulative weights over categories) and activity levels."""

    def __init__(self, n: int, world: World, rng: np.random.Generator, draw: _Uniform, no: _Uniform) -> None:
        n_cat = len(world.cat_items)
        interest = rng.gamma(0.25, 1.0, (n, n_cat)) * world.cat_weight + 1e-9
        self.interest = interest / interest.sum(axis=1, keepdims=True)
        self.cdf = [np.cumsum(row).tolist() for row in self.interest]
        self.activity = np.exp(rng.normal(0.0, 0.8, n)).tolist()
        self.world, self.draw, self.cat_cdf = world, draw, np.cumsum(world.cat_weight).tolist()
        self.no = no  # the dismisses' own draws

    def dismissed(self, u: int) -> int | None:
        """Sometimes a popular item of a category the user cares less for than average."""
        if self.no() >= P_DISMISS:
            return None
        n_cat = len(self.world.cat_items)
        cat = min(int(self.no() * n_cat), n_cat - 1)
        if self.interest[u][cat] * n_cat >= 1.0:
            return None
        return self.world.cat_items[cat][self.no.pick(self.world.cat_cdf[cat])]

    def category(self, u: int) -> int:
        return self.draw.pick(self.cdf[u])

    def maybe_drift(self, u: int) -> None:
        if self.draw() < P_DRIFT:
            row = self.interest[u] * (1.0 - DRIFT_WEIGHT)
            row[self.draw.pick(self.cat_cdf)] += DRIFT_WEIGHT
            self.interest[u] = row
            self.cdf[u] = np.cumsum(row).tolist()

    def next_gap(self, u: int) -> float:
        """Seconds until the user's next session: hours to days, busier users sooner."""
        return 1800.0 + self.draw.expo(36 * 3600.0 / self.activity[u])


def _session(u: int, sid: str, start: float, users: _Users) -> list[tuple[float, str, str | None, str | None]]:
    """One session as (ts, type, item_id, query) tuples in time order."""
    w, draw = users.world, users.draw
    t, out, cart = start, [], []

    def popular(cat: int) -> int:
        return w.cat_items[cat][draw.pick(w.cat_cdf[cat])]

    def search() -> int:
        cat = users.category(u)
        target = popular(cat)
        adj, noun = w.item_words[target]
        r = draw()
        query = noun if r < 0.4 else f"{adj} {noun}" if r < 0.8 else f"{noun} {adj}"
        out.append((t, "search", None, query.replace("-", " ")))
        return target if draw() < 0.8 else popular(cat)

    item = search() if draw() < P_SEARCH_START else popular(users.category(u))
    while True:
        t += 2.0 + draw.expo(8.0)
        out.append((t, "view", f"i{item}", None))
        other = users.dismissed(u)
        if other is not None:  # before any next event: those come >= 1 s later
            out.append((t + 0.5, "dismiss", f"i{other}", None))
        if draw() < P_CLICK:
            t += 1.0 + draw.expo(6.0)
            out.append((t, "click", f"i{item}", None))
            if draw() < P_CART:
                t += 5.0 + draw.expo(20.0)
                out.append((t, "add_to_cart", f"i{item}", None))
                cart.append(item)
        if draw() < P_END:
            break
        t += 3.0 + draw.expo(25.0)
        if draw() < P_SEARCH_MID:
            item = search()
        elif w.successors[item] and draw() < P_FOLLOW:
            r, acc, nxt = draw(), 0.0, w.successors[item][-1]
            for cand, p in zip(w.successors[item], SUCCESSOR_P):
                acc += p
                if r < acc:
                    nxt = cand
                    break
            item = nxt
        else:
            item = popular(w.item_cat[item] if draw() < P_STAY else users.category(u))
    for item in dict.fromkeys(cart):
        if draw() < P_BUY:
            t += 10.0 + draw.expo(40.0)
            out.append((t, "purchase", f"i{item}", None))
    return out


def _simulate(users: int, items: int, seed: int) -> Iterator[dict]:
    """All users' sessions merged into one endless, time-ordered event stream.

    Sessions start in time order (a heap of each user's next start); their events wait in a
    second heap until no session that could still start can precede them.
    """
    if users < 1:
        raise UserError("--users must be at least 1")
    world = _world(items, seed)
    _, rng, no = _rngs(seed)
    draw = _Uniform(rng)
    people = _Users(users, world, rng, draw, _Uniform(no))
    starts = [(BASE_TS + draw.expo(36 * 3600.0 / people.activity[u]), u) for u in range(users)]
    heapq.heapify(starts)
    pending: list[tuple[float, int, int, str, str, str | None, str | None]] = []
    n_sessions = n_seq = n_out = 0
    while True:
        start, u = heapq.heappop(starts)
        people.maybe_drift(u)
        sid = f"s{seed}-{n_sessions}"
        n_sessions += 1
        evs = _session(u, sid, start, people)
        for ts, etype, item, query in evs:
            heapq.heappush(pending, (ts, n_seq, u, sid, etype, item, query))
            n_seq += 1
        end = next(e[0] for e in reversed(evs) if e[1] != "dismiss")  # as if there were none
        heapq.heappush(starts, (end + people.next_gap(u), u))
        horizon = starts[0][0]
        while pending and pending[0][0] <= horizon:
            ts, _, u2, sid2, etype, item, query = heapq.heappop(pending)
            event = {"event_id": f"e{seed}-{n_out}", "user_id": f"u{u2}", "session_id": sid2, "type": etype}
            event["query" if item is None else "item_id"] = query if item is None else item
            event["ts"] = int(ts)
            n_out += 1
            yield event


def stream(users: int, items: int, seed: int = 0) -> Iterator[dict]:
    """Endless time-ordered events from the same world model as generate()."""
    if users < 1 or items < 1:
        raise UserError("users and items must be at least 1")
    return _simulate(users, items, seed)


def generate(users: int, items: int, events: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(events in global time order, catalog rows): the first `events` events of stream()."""
    if events < 1:
        raise UserError("--events must be at least 1")
    return list(islice(_simulate(users, items, seed), events)), catalog(items, seed)


def item_sequences(events: list[dict]) -> dict[str, list[str]]:
    """Per-user item sequences in time order (searches and dismisses dropped, repeats collapsed:
    view, click and add_to_cart of one item are one interaction, as in the `pairs` format)."""
    seqs: dict[str, list[str]] = {}
    for e in events:
        if e["type"] not in ("search", "dismiss"):
            seq = seqs.setdefault(e["user_id"], [])
            if not seq or seq[-1] != e["item_id"]:
                seq.append(e["item_id"])
    return seqs


# ---------------------------------------------------------------- CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=1000, help="number of users (default 1000)")
    parser.add_argument("--items", type=int, default=2000, help="number of catalog items (default 2000)")
    parser.add_argument("--events", type=int, default=100_000, help="number of events (default 100000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed; same arguments give identical files")
    parser.add_argument("--out", required=True, type=Path, help="output file")
    parser.add_argument("--format", choices=("jsonl", "pairs"), default="jsonl",
                        help="jsonl: one event per line; pairs: 'user_id item_id' per line, each user's "
                             "item interactions in time order (searches dropped, repeats collapsed)")
    parser.add_argument("--catalog", type=Path, help="also write the catalog (item_id, title, category, price) as JSONL")


def _open(path: Path, flag: str):
    if path.parent and not path.parent.is_dir():
        raise UserError(f"directory {path.parent} does not exist; create it or choose another {flag}")
    try:
        return path.open("w", encoding="utf-8")
    except OSError as exc:
        raise UserError(f"cannot write {path} ({exc.strerror}); choose a writable {flag} path") from None


def _with_progress(events: Iterator[dict], total: int) -> Iterator[dict]:
    if total < 50_000:
        yield from events
        return
    from rich.console import Console
    from rich.progress import Progress

    with Progress(console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("synthesising events", total=total)
        for n, event in enumerate(events, 1):
            yield event
            if n % 5000 == 0 or n == total:
                bar.update(task, completed=n)


def _write_pairs(fh, events: Iterator[dict], keep: Callable[[dict], None]) -> None:
    seen = []
    for e in events:
        keep(e)
        seen.append(e)
    seqs = item_sequences(seen)
    for user in sorted(seqs, key=lambda s: int(s[1:])):
        fh.writelines(f"{user} {item}\n" for item in seqs[user])


def run(args: argparse.Namespace) -> int:
    for flag in ("users", "items", "events"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag} must be at least 1")
    files = [(args.out, "--out")] + ([(args.catalog, "--catalog")] if args.catalog else [])
    handles = [_open(path, flag) for path, flag in files]
    counts: Counter[str] = Counter()
    active: set[str] = set()

    def keep(e: dict) -> None:
        counts[e["type"]] += 1
        active.add(e["user_id"])

    events = _with_progress(islice(_simulate(args.users, args.items, args.seed), args.events), args.events)
    with handles[0] as out:
        if args.format == "pairs":
            _write_pairs(out, events, keep)
        else:
            for e in events:
                keep(e)
                out.write(json.dumps(e, separators=(",", ":")) + "\n")
    if args.catalog:
        with handles[1] as fh:
            fh.writelines(json.dumps(row, separators=(",", ":")) + "\n" for row in catalog(args.items, args.seed))
    mix = ", ".join(f"{t} {counts[t]}" for t in EVENT_TYPES)
    print(f"synth: {sum(counts.values())} events, {len(active)}/{args.users} users active, "
          f"{args.items} items -> {args.out} ({args.format}) [{mix}]")
    return 0
