"""Send events to the events topic from a JSONL file, or catalog rows to the catalog topic.

Events are keyed by user_id (state is partitioned by key). Against Kafka the producer is
idempotent (`--idempotence auto`): a retried send is not written twice, so the topic holds
what the file held. Against the embedded broker (Tansu) it is not, unless told: Tansu
refuses aiokafka's idempotent producer and what it does with kafka-python's sequence
numbers is not established (docs/facts.md). Either way the worker's event_id dedupe makes
the effect exactly-once (docs/design.md, "Idempotent replay"). The `--synthetic` source of
`streamrec produce` is tooling and lives in stream_app/testing/traffic.py, which builds on
this module."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator

from stream_app.config import SECURITY_FIELDS, Settings, add_settings_arguments, settings_from_args
from stream_app.errors import UserError
from stream_app.pipeline.events import encode_event

EXAMPLES = """examples:
  export STREAMREC_BOOTSTRAP_SERVERS=127.0.0.1:9092
  streamrec produce --synthetic --rate 500 --duration 60
  streamrec produce --file events.jsonl --rate 2000
  streamrec produce --synthetic --rate 200 --duration 30 --bad-rate 0.01   # 1% malformed
  streamrec produce --catalog catalog.jsonl      # item upserts: {"item_id","title","category","price","available"}
  streamrec produce --file events.jsonl --idempotence off   # a broker that refuses idempotent producers
"""
IDEMPOTENCE = ("auto", "on", "off")


class EventProducer:
    """kafka-python producer with a steady-rate pacer; counts what it sent and what the
    broker refused. acks=all: a send counts as done only once every in-sync replica has
    it, so a client that exits 0 (`produce`, `forget`) has not lost what it sent to a
    broker failover."""

    def __init__(self, bootstrap: str, topic: str, options: dict[str, Any] | None = None) -> None:
        """`options`: security arguments from stream_app.transport.security.kafka_python_options, or
        producer settings to override (linger_ms)."""
        from kafka import KafkaProducer

        self.topic = topic
        self.producer = KafkaProducer(**{"bootstrap_servers": bootstrap, "enable_idempotence": False, "acks": "all",
                                         "linger_ms": 5, "max_request_size": 1_048_576, **(options or {})})
        self.idempotent = bool(self.producer.config.get("enable_idempotence"))
        self.sent = 0
        self.failed = 0
        self.last_error = ""

    def send(self, value: bytes, key: bytes | None) -> None:
        try:
            self.producer.send(self.topic, value=value, key=key).add_errback(self._refused)
        except Exception as exc:  # refused before it left: too large, no metadata in time
            self._refused(exc)
        self.sent += 1

    def _refused(self, exc: BaseException) -> None:
        self.failed += 1
        self.last_error = f"{type(exc).__name__}: {exc}"

    def check(self) -> None:
        """After a flush: a one-line error if the broker refused any send."""
        if self.failed:
            hint = " (or pass --idempotence off if it refuses idempotent producers)" if self.idempotent else ""
            raise UserError(f"{self.failed} of {self.sent} messages were not written to {self.topic} "
                            f"({self.last_error}); check the broker{hint} and resend")

    def send_event(self, event: dict) -> None:
        self.send(encode_event(event), str(event["user_id"]).encode())

    def paced(self, messages: Iterable[tuple[bytes, bytes | None]], rate: float | None,
              duration: float | None = None, progress: bool = False) -> int:
        """Send at `rate` msg/s (None: as fast as possible) until exhausted or `duration` s."""
        start = time.monotonic()
        last_report = start
        for i, (value, key) in enumerate(messages):
            now = time.monotonic()
            if duration is not None and now - start >= duration:
                break
            if rate:
                ahead = start + i / rate - now
                if ahead > 0:
                    time.sleep(ahead)
            self.send(value, key)
            if progress and now - last_report >= 5:
                last_report = now
                print(f"produce: {self.sent} sent ({self.sent / (now - start):.0f}/s)", file=sys.stderr)
        self.flush()
        return self.sent

    def flush(self) -> None:
        self.producer.flush(timeout=30)

    def close(self) -> None:
        self.producer.close(timeout=10)


def file_messages(path: Path) -> Iterator[tuple[bytes, bytes | None]]:
    """Lines as they are (bad lines included: the worker dead-letters them)."""
    with path.open("rb") as f:
        for line in f:
            line = line.rstrip(b"\r\n")
            if not line:
                continue
            try:
                key = str(json.loads(line)["user_id"]).encode()
            except Exception:
                key = None
            yield line, key


def add_arguments(parser: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
    """Returns the group of message sources, so that a tool can add one of its own."""
    src = parser.add_mutually_exclusive_group(required=True)
    src.add_argument("--file", type=Path, help="JSONL events file")
    src.add_argument("--catalog", type=Path, help="JSONL catalog rows -> the compacted catalog topic")
    parser.add_argument("--rate", type=float, default=None, help="messages/s (default: synthetic 200, file unpaced)")
    parser.add_argument("--duration", type=float, default=None, help="seconds to run (synthetic default: 60)")
    parser.add_argument("--idempotence", choices=IDEMPOTENCE, default="auto",
                        help="idempotent producer: auto (default) is on against Kafka, off against the embedded "
                             "broker (Tansu, known by its cluster id)")
    add_settings_arguments(parser, only=["bootstrap_servers", "events_topic", "catalog_topic", *SECURITY_FIELDS])
    return src


def catalog_messages(path: Path) -> Iterator[tuple[bytes, bytes | None]]:
    """Catalog rows keyed by item_id (compaction keeps the latest per item)."""
    for n, (line, _) in enumerate(file_messages(path), 1):
        try:
            item_id = str(json.loads(line)["item_id"])
        except (ValueError, KeyError, TypeError):
            raise UserError(f"{path}:{n} is not a catalog row; each line needs JSON with an item_id") from None
        yield line, item_id.encode()


def run(args: argparse.Namespace, synthetic: Iterable[tuple[bytes, bytes | None]] | None = None) -> int:
    """`synthetic`: an endless message source from a tool (paced at 200/s for 60 s unless told)."""
    settings: Settings = settings_from_args(args)
    if settings.embedded:
        raise UserError("no broker configured; set STREAMREC_BOOTSTRAP_SERVERS (e.g. the address "
                        "`streamrec demo`, `broker` or `worker` printed) or pass --bootstrap-servers")
    for path in (args.file, args.catalog):
        if path is not None and not path.is_file():
            raise UserError(f"{path} not found; create one with `streamrec synth --out FILE --catalog FILE`")
    from stream_app.transport.broker import wait_for_broker
    from stream_app.transport.security import kafka_python_options

    options = kafka_python_options(settings)
    wait_for_broker(settings.bootstrap_servers, settings.broker_connect_timeout_s, options)
    topic = settings.catalog_topic if args.catalog else settings.events_topic
    producer = open_producer(settings.bootstrap_servers, topic, options, args.idempotence)
    try:
        if args.catalog:
            sent = producer.paced(catalog_messages(args.catalog), args.rate, args.duration)
        elif synthetic is not None:
            sent = producer.paced(synthetic, args.rate or 200, args.duration or 60, progress=True)
        else:
            sent = producer.paced(file_messages(args.file), args.rate, args.duration, progress=True)
    finally:
        producer.close()
    producer.check()
    print(f"produce: {sent} messages sent to {topic} at {settings.bootstrap_servers} "
          f"(idempotence {'on' if producer.idempotent else 'off'})")
    return 0


def open_producer(bootstrap: str, topic: str, options: dict[str, Any], idempotence: str = "auto") -> EventProducer:
    """The producer for `--idempotence`: `auto` is on unless the broker is the embedded one.
    A broker that cannot take an idempotent producer (Kafka before 0.11, which kafka-python
    refuses when idempotence is asked for) is a one-line error naming the flag."""
    from kafka.errors import KafkaConfigurationError

    from stream_app.transport.broker import is_tansu

    wanted = idempotence == "on" or (idempotence == "auto" and not is_tansu(bootstrap, options))
    try:
        return EventProducer(bootstrap, topic, {**options, "enable_idempotence": wanted})
    except KafkaConfigurationError as exc:
        raise UserError(f"Kafka at {bootstrap} cannot take an idempotent producer ({exc}); "
                        "pass --idempotence off") from None
