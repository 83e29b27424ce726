"""Send events to the events topic: a live synthetic stream at a fixed rate, or a JSONL file.

This is the `streamrec produce` command. Files and catalogs go through the product
client (stream_app/clients/produce.py); `--synthetic` adds the endless synthetic
clickstream that the demo and the benchmarks send too, with an optional share of
malformed messages. It lives with the tooling because it draws on the synthetic world
and the hostile cases, which product code never imports (docs/design.md, "Product never
imports tooling").
"""
from __future__ import annotations

import argparse
import random
import time
from typing import Iterator

from stream_app.clients import produce
from stream_app.pipeline.events import encode_event
from stream_app.testing.hostile import malformed
from stream_app.testing.synth import stream

EXAMPLES = produce.EXAMPLES


def synthetic_messages(users: int, items: int, seed: int, bad_rate: float = 0.0) -> Iterator[tuple[bytes, bytes | None]]:
    """Endless synthetic stream, timestamped now, with a share of malformed messages."""
    rng = random.Random(seed)
    for n, event in enumerate(stream(users, items, seed)):
        if bad_rate and rng.random() < bad_rate:
            payload, _ = malformed(rng, n)
            yield payload, None
        event["ts"] = round(time.time(), 3)
        yield encode_event(event), event["user_id"].encode()


def send_catalog(settings, items: int, seed: int = 0) -> None:
    """The synthetic catalog of `items` items (categories, prices, a brand attribute) on the
    settings' catalog topic: what rules and similar items read."""
    import json

    from stream_app.testing.synth import catalog

    producer = produce.EventProducer(settings.bootstrap_servers, settings.catalog_topic)
    for row in catalog(items, seed):
        row["attributes"] = {"brand": row["title"].split()[0]}
        producer.send(json.dumps(row).encode(), row["item_id"].encode())
    producer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sources = produce.add_arguments(parser)
    sources.add_argument("--synthetic", action="store_true", help="endless synthetic clickstream")
    parser.add_argument("--users", type=int, default=2000, help="synthetic users")
    parser.add_argument("--items", type=int, default=5000, help="synthetic items")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bad-rate", type=float, default=0.0, help="share of malformed messages (synthetic)")


def run(args: argparse.Namespace) -> int:
    messages = synthetic_messages(args.users, args.items, args.seed, args.bad_rate) if args.synthetic else None
    return produce.run(args, synthetic=messages)
