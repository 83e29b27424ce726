"""A `pairs` dataset as a time-ordered stream, for `eval --protocol prequential`.

`user item` files keep each user's order but have no clock. Users' sequences are
interleaved in a seeded random order, one event per second, which keeps every user's
order and makes a stationary stream: the real-data check that continual learning does
not forget. Writes `OUT.jsonl` (the whole stream, with `ts`) and `OUT.prefix.pairs`
(the events before the cut, for `streamrec train`, which then ignores time like any
`pairs` training) and prints the `--train-until` of the cut.

    python -m stream_app.testing.interleave beauty.pairs.gz /tmp/beauty --until 0.7
"""
from __future__ import annotations

import argparse
import json

import numpy as np

from model.data import load

BASE_TS = 1_600_000_000


def interleave(path: str, seed: int = 0) -> list[tuple[str, str]]:
    """(user, item) in a seeded interleaving of the users' sequences."""
    ds = load(path, "pairs")
    owner = np.repeat(np.arange(len(ds.users)), [len(h) for h in ds.histories])
    np.random.default_rng(seed).shuffle(owner)
    nxt = [0] * len(ds.users)
    out = []
    for u in owner.tolist():
        out.append((ds.users[u], ds.histories[u][nxt[u]].item_id))
        nxt[u] += 1
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data")
    p.add_argument("out", help="output prefix: OUT.jsonl and OUT.prefix.pairs")
    p.add_argument("--until", type=float, default=0.7, help="share of the stream before the cut")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rows = interleave(a.data, a.seed)
    cut = int(len(rows) * a.until)
    with open(a.out + ".jsonl", "w") as f, open(a.out + ".prefix.pairs", "w") as g:
        for n, (u, i) in enumerate(rows):
            f.write(json.dumps({"event_id": f"e{n}", "user_id": u, "item_id": i, "type": "click",
                                "ts": BASE_TS + n}) + "\n")
            if n < cut:
                g.write(f"{u} {i}\n")
    print(f"{len(rows)} events; --train-until {BASE_TS + cut}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
