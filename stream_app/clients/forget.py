"""Erase a user: their state (with a changelog tombstone), KV caches and latest
recommendations (with a tombstone on the recommendations topic).

It is an event like any other, so it is ordered after everything the user did before
it, reaches the worker that owns the user, and survives crashes (at-least-once; forget
is idempotent). Anyone who may write the events topic may forget any user: grant that
ACL only to your producers (docs/security.md, "Who may forget")."""
from __future__ import annotations

import argparse
import time
import uuid

from stream_app.config import SECURITY_FIELDS, add_settings_arguments, settings_from_args
from stream_app.errors import UserError

EXAMPLES = """examples:
  export STREAMREC_BOOTSTRAP_SERVERS=127.0.0.1:9092
  streamrec forget u42
  streamrec forget u42 u43 u44
"""


def forget_event(user_id: str) -> dict:
    return {"event_id": f"forget-{uuid.uuid4()}", "user_id": user_id, "type": "forget", "ts": round(time.time(), 3)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("user_ids", nargs="+", metavar="USER_ID")
    add_settings_arguments(parser, only=["bootstrap_servers", "events_topic", *SECURITY_FIELDS])


def run(args: argparse.Namespace) -> int:
    from stream_app.transport.broker import wait_for_broker
    from stream_app.clients.produce import EventProducer
    from stream_app.transport.security import kafka_python_options

    settings = settings_from_args(args)
    if settings.embedded:
        raise UserError("no broker configured; set STREAMREC_BOOTSTRAP_SERVERS or pass --bootstrap-servers")
    options = kafka_python_options(settings)
    wait_for_broker(settings.bootstrap_servers, settings.broker_connect_timeout_s, options)
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic, options)
    for user_id in args.user_ids:
        producer.send_event(forget_event(user_id))
    producer.flush()  # acks=all: written to every in-sync replica, or counted as refused
    producer.close()
    producer.check()  # exit non-zero, naming the cause, if any forget was not written
    print(f"forget: {len(args.user_ids)} user(s) written to {settings.events_topic}")
    return 0
