"""Embedded broker limit: fetch latency as a partition's stored batches grow.

Tansu's memory store lists every batch of a partition on each fetch and stops listing
when the fetch wait runs out (docs/facts.md, Tansu), so past some number of batches a consumer
with a short wait gets nothing at all. This finds that number on the current machine and
Tansu build (a new build can be checked for the upstream fix). Baseline, in the same
run: the same fetches with a longer wait.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path

EXAMPLES = """examples:
  streamrec bench broker --json broker.json
  streamrec bench broker --levels 5000,20000 --waits 50   # a quick look
"""


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--levels", type=_ints, default=_ints("10000,40000,80000,160000"),
                        help="batches stored in the partition at each probe (comma list, ascending)")
    parser.add_argument("--waits", type=_ints, default=_ints("50,500"),
                        help="consumer fetch_max_wait_ms values to probe with (the worker's default: 50)")
    parser.add_argument("--probe-timeout-s", type=float, default=10.0, help="give up on a probe after this")
    parser.add_argument("--json", type=Path, default=Path("broker.json"))


async def _fill(bootstrap: str, topic: str, count: int) -> None:
    """`count` single-record batches, as the worker's producer writes on this broker."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, max_batch_size=1, linger_ms=0, enable_idempotence=False)
    await producer.start()
    try:
        for start in range(0, count, 1000):
            sends = [await producer.send(topic, b"x" * 150) for _ in range(min(1000, count - start))]
            await asyncio.gather(*sends)
    finally:
        await producer.stop()


def probe(bootstrap: str, topic: str, offset: int, wait_ms: int, timeout: float) -> float | None:
    """Milliseconds until a fresh consumer gets records at `offset`; None: nothing in `timeout`."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=wait_ms, enable_auto_commit=False)
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        consumer.seek(tp, offset)
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if consumer.poll(timeout_ms=200, max_records=5):
                return round((time.monotonic() - start) * 1000, 1)
        return None
    finally:
        consumer.close()


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stream_app.transport.broker import EmbeddedBroker, ensure_topics
    from stream_app.config import Settings

    console = Console()
    rows: list[dict] = []
    with EmbeddedBroker() as broker:
        ensure_topics(Settings(bootstrap_servers=broker.bootstrap, partitions=1), ["limit"])
        stored = 0
        for level in sorted(args.levels):
            started = time.monotonic()
            with console.status(f"writing single-record batches {stored:,} -> {level:,} ..."):
                asyncio.run(_fill(broker.bootstrap, "limit", level - stored))
            fill_per_s = (level - stored) / (time.monotonic() - started)
            stored = level
            row: dict = {"batches": level, "fill_per_s": round(fill_per_s)}
            for wait in args.waits:
                row[f"newest_{wait}ms"] = probe(broker.bootstrap, "limit", level - 3, wait, args.probe_timeout_s)
                row[f"oldest_{wait}ms"] = probe(broker.bootstrap, "limit", 0, wait, args.probe_timeout_s)
            rows.append(row)
            console.print(json.dumps(row))
    table = Table(title=f"ms until a fresh consumer gets records (—: none in {args.probe_timeout_s:.0f} s)")
    for key in rows[0]:
        table.add_column(key.replace("_", " "), justify="right")
    for row in rows:
        table.add_row(*("—" if v is None else f"{v:,}" for v in row.values()))
    console.print(table)
    key = f"newest_{min(args.waits)}ms"
    starved = next((r["batches"] for r in rows if r[key] is None), None)
    served = max((r["batches"] for r in rows if starved is None or r["batches"] < starved), default=0)
    verdict = (f"a {min(args.waits)} ms fetch of the newest records: served at {served:,} batches"
               + (f", nothing at {starved:,}" if starved else ""))
    console.print(verdict)
    args.json.write_text(json.dumps({"waits_ms": args.waits, "probe_timeout_s": args.probe_timeout_s,
                                     "verdict": verdict, "rows": rows}, indent=2) + "\n")
    return 0
