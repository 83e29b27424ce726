"""The fault matrix: each row injects one fault into real processes (embedded broker, real
workers and learners, real RocksDB) and counts what it cost: events lost, duplicated or
differing from an offline replay, good events dead-lettered, crashes, and the seconds from
the fault's end until the worker is ready and has answered every user's newest event.

Each row runs on its own topics, consumer group and state directory on one shared broker,
so rows never see each other's data. `--quick` is the CI size (tests/bench/test_faults_bench.py).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

from stream_app.bench.faults_model import bad_checkpoints, learner_kills, two_learners
from stream_app.testing.faultkit import Ctx, Row, as_messages, judged, send, wait
from stream_app.testing.harness import TopicReader, metric_sum
from stream_app.testing.synth import generate

EXAMPLES = """examples:
  streamrec bench faults --json faults.json
  streamrec bench faults --quick --rows poison_batch,hostile_catalog
"""


# ---- rows ---------------------------------------------------------------------------
def failing_batches(ctx: Ctx, name: str, spec: str, what: str) -> Row:
    settings = ctx.settings(name, batch_max=100)
    worker = ctx.worker(settings, name, {"STREAMREC_FAILPOINTS": spec})
    try:
        events, _ = generate(users=300, items=500, events=ctx.events, seed=1)
        send(settings, as_messages(events), rate=1000)
        row = judged(Row(name, what), settings, events, time.monotonic(), worker)
        kind = "environment" if "enospc" in spec else "data"
        row.checks["batches failed"] = worker.metrics()[f'streamrec_batch_failures_total{{kind="{kind}"}}'] > 0
        return row
    finally:
        worker.stop()


def poison_batch(ctx: Ctx) -> Row:
    return failing_batches(ctx, "poison_batch", "batch=raise@20", "an exception in 1 batch of 20")


def full_disk(ctx: Ctx) -> Row:
    return failing_batches(ctx, "full_disk", "batch=enospc@20", "ENOSPC from 1 batch of 20")


def huge_key(ctx: Ctx) -> Row:
    settings = ctx.settings("huge_key")
    worker = ctx.worker(settings, "huge_key")
    try:
        events, _ = generate(users=200, items=300, events=ctx.events // 2, seed=2)
        huge = [(b"{broken", b"k" * 900_000) for _ in range(10)]
        send(settings, list(as_messages(events[: len(events) // 2])) + huge + list(as_messages(events[len(events) // 2:])))
        row = judged(Row("huge_key", "10 messages keyed with 900 KB"), settings, events, time.monotonic(), worker)
        dlq = TopicReader(settings.bootstrap_servers, settings.dlq_topic)
        dead = dlq.read_until(lambda rs: len(rs) >= 10, 60)
        dlq.close()
        row.checks["10 dead-lettered, keys cut to 1 KiB"] = len(dead) == 10 and all(len(r.key) == 1024 for r in dead)
        return row
    finally:
        worker.stop()


def hostile_catalog_records(n: int) -> list[tuple[bytes | None, bytes | None]]:
    """Catalog records that once crashed or fooled a worker, cycled to `n`."""
    kinds = [
        (b"deep", b"[" * 5000 + b"]" * 5000),
        (b"deeper", b'{"item_id": "i1", "title": ' + b"[" * 30_000 + b"]" * 30_000 + b"}"),
        (b"bad-category", b'{"item_id": "i2", "category": "\\ud800"}'),
        (b"bad-id", b'{"item_id": "x\\udfff"}'),
        (None, b'{"title": "no id"}'),
        (b"list", b"[1, 2, 3]"),
        (b"number", b"42"),
        (b"\xff\xfe", b'{"item_id": "i3"}'),
        (b"i4", b'{"item_id": "i4", "available": "false"}'),
        (b"i5", b'{"item_id": "i5", "available": 0}'),
        (b"i6", b'{"item_id": "i6", "price": NaN}'),
        (b"big", b'{"item_id": "big", "title": "' + b"t" * 70_000 + b'"}'),
        (b"junk", bytes(range(256))),
    ]
    return [kinds[i % len(kinds)] for i in range(n)]


def hostile_catalog(ctx: Ctx, records: int = 10_000) -> Row:
    from stream_app.clients.produce import EventProducer
    settings = ctx.settings("hostile_catalog")
    events, catalog = generate(users=300, items=200, events=ctx.events, seed=3)
    withdrawn = [r["item_id"] for r in catalog[:20]]  # the most popular items of the synthetic world
    producer = EventProducer(settings.bootstrap_servers, settings.catalog_topic, {"max_request_size": 4 << 20})
    for key, value in hostile_catalog_records(records):
        producer.producer.send(settings.catalog_topic, key=key, value=value)
    for r in catalog:
        producer.producer.send(settings.catalog_topic, key=r["item_id"].encode(),
                               value=json.dumps({**r, "available": r["item_id"] not in withdrawn}).encode())
    producer.producer.flush(timeout=120)
    producer.close()
    worker = ctx.worker(settings, "hostile_catalog")
    row = Row("hostile_catalog", f"{records:,} hostile catalog records, then a restart")
    try:
        send(settings, as_messages(events[: len(events) // 2]), rate=1000)
        worker.stop()
        down = time.monotonic()
        worker = ctx.worker(settings, "hostile_catalog")  # the compacted topic replays them all
        row.recover_s = round(time.monotonic() - down, 1)
        send(settings, as_messages(events[len(events) // 2:]), rate=1000)
        restart_s = row.recover_s
        judged(row, settings, events, time.monotonic(), worker)
        row.recover_s = max(restart_s, row.recover_s)
        recs = TopicReader(settings.bootstrap_servers, settings.recommendations_topic).read_to_end(60)
        shown = sum(any(i["item_id"] in withdrawn for i in json.loads(r.value)["items"]) for r in recs if r.value)
        m = worker.metrics()
        row.checks["withdrawn items in 0 recommendations"] = shown == 0 and len(recs) > 0
        row.checks["every hostile record rejected and counted"] = \
            metric_sum(m, "streamrec_catalog_rejected_total") >= records
        return row
    finally:
        worker.stop()


def forget_race(ctx: Ctx, users: int = 50) -> Row:
    """Per user: events, then 3 events mis-keyed (they go to another partition first and
    are re-published keyed by user), then at once a forget. The forget must win: no
    forgotten user may be in state at the end."""
    from stream_app.testing.consistency import read_changelog
    settings = ctx.settings("forget_race", partitions=4)
    worker = ctx.worker(settings, "forget_race")
    try:
        messages = []
        for u in range(users):
            user = f"fr{u}"
            ev = lambda n: {"event_id": f"{user}-{n}", "user_id": user, "type": "click", "item_id": f"i{n}",
                            "ts": 1.76e9 + n}
            messages += [(json.dumps(ev(n)).encode(), user.encode()) for n in range(3)]
            messages += [(json.dumps(ev(n)).encode(), f"other-{u}-{n}".encode()) for n in range(3, 6)]
            messages.append((json.dumps({"event_id": f"{user}-forget", "user_id": user, "type": "forget",
                                         "ts": 1.76e9 + 9}).encode(), user.encode()))
        sent_at = time.monotonic()
        send(settings, messages)
        m = lambda: worker.metrics()
        wait(lambda: metric_sum(m(), "streamrec_events_rekeyed_total") >= 3 * users and
             m()['streamrec_events_total{type="forget"}'] >= users, 60)
        time.sleep(3)  # the re-published events are processed after the forgets
        back = [u for u in read_changelog(settings) if u.startswith("fr")]
        row = Row("forget_race", f"{users} users: 3 mis-keyed events each, then at once a forget",
                  sent=len(messages), lost=0, recover_s=round(time.monotonic() - sent_at, 1))
        row.checks[f"forgotten users back in state: {len(back)}"] = not back
        stale = int(m().get("streamrec_stale_after_forget_total", 0))
        row.checks[f"the race happened ({stale} re-published events arrived after their forget, dropped)"] = stale > 0
        row.crashes = int(not worker.alive())
        return row
    finally:
        worker.stop()


def hot_user(ctx: Ctx) -> Row:
    """One user at 500 events/s, the worker SIGKILLed mid-stream and restarted."""
    import threading
    settings = ctx.settings("hot_user")
    worker = ctx.worker(settings, "hot_user")
    n = max(1000, ctx.events // 2)
    events = [{"event_id": f"hot-{i}", "user_id": "hot", "item_id": f"i{i % 97}", "type": "click",
               "ts": 1.76e9 + i * 0.002} for i in range(n)]
    feeding = threading.Thread(target=send, args=(settings, as_messages(events), 500.0))
    feeding.start()
    time.sleep(n / 500 / 2)
    worker.kill()
    down = time.monotonic()
    worker = ctx.worker(settings, "hot_user")
    restart_s = round(time.monotonic() - down, 1)
    feeding.join()
    try:
        row = judged(Row("hot_user", "one user at 500 events/s through a SIGKILL"), settings, events,
                     time.monotonic(), worker)
        row.recover_s = max(restart_s, row.recover_s)
        return row
    finally:
        worker.stop()


def paused_worker(ctx: Ctx, pause_s: float = 30.0) -> Row:
    """Two workers share four partitions; one is SIGSTOPped for `pause_s` (past the session
    timeout, so the other takes its partitions) while events keep coming, then resumed."""
    import os
    import signal
    import threading

    from stream_app.transport.broker import free_port
    settings = ctx.settings("paused_worker", partitions=4)
    a = ctx.worker(settings, "paused-a")
    b = ctx.worker(settings.model_copy(update={"state_dir": ctx.workdir / "paused-b-state", "web_port": free_port()}),
                   "paused-b")
    wait(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 60)
    events, _ = generate(users=300, items=300, events=ctx.events, seed=6)
    rate = max(200.0, len(events) / (pause_s + 20))
    feeding = threading.Thread(target=send, args=(settings, as_messages(events), rate))
    feeding.start()
    time.sleep(3)
    row = Row("paused_worker", f"one of two workers SIGSTOPped for {pause_s:.0f} s, then resumed")
    os.kill(b.proc.pid, signal.SIGSTOP)
    try:
        row.checks["the other takes every partition"] = wait(lambda: a.partitions() == [0, 1, 2, 3], pause_s)
        time.sleep(max(0.0, pause_s - 3))
    finally:
        os.kill(b.proc.pid, signal.SIGCONT)
    resumed = time.monotonic()
    try:
        feeding.join()
        judged(row, settings, events, resumed, a)
        m = b.metrics()
        row.crashes += int(not b.alive())
        row.checks["the paused worker noticed its stall"] = m.get("streamrec_stalls_total", 0) >= 1
        row.fenced_batches = int(m.get("streamrec_fenced_batches_total", 0))
        row.checks["0 stale writes on the changelog"] = changelog_regressions(settings) == 0
        row.good_dead_lettered += int(m.get('streamrec_invalid_events_total{reason="processing_error"}', 0))
        return row
    finally:
        a.stop()
        b.stop()


def changelog_regressions(settings) -> int:
    """Changelog records whose user's event count is below the one before it: what a
    worker writing from a stale state, after its partition moved, leaves behind."""
    from stream_app.testing.consistency import changelog_topic
    reader = TopicReader(settings.bootstrap_servers, changelog_topic(settings))
    last: dict[bytes, int] = {}
    regressions = 0
    try:
        for r in reader.read_to_end():
            if not r.value:
                last.pop(r.key, None)
                continue
            count = json.loads(r.value).get("n", 0)
            regressions += count < last.get(r.key, 0)
            last[r.key] = count
    finally:
        reader.close()
    return regressions


ROWS: dict[str, Callable[[Ctx], Row]] = {
    "poison_batch": poison_batch, "full_disk": full_disk, "huge_key": huge_key, "hostile_catalog": hostile_catalog,
    "bad_checkpoints": bad_checkpoints, "two_learners": two_learners, "hot_user": hot_user,
    "paused_worker": paused_worker, "learner_kills": learner_kills, "forget_race": forget_race,
}


def run_matrix(bootstrap: str, rows: list[str], events: int, workdir: Path, say=print) -> list[Row]:
    ctx = Ctx(bootstrap, workdir, events, say)
    done = []
    for name in rows:
        t0 = time.monotonic()
        say(f"faults: {name} ...")
        try:
            row = ROWS[name](ctx)
        except Exception as exc:  # a row that could not run is a failed row, not a crashed bench
            row = Row(name, "did not run", crashes=1, checks={f"ran ({type(exc).__name__}: {exc})"[:200]: False})
        say(f"faults: {name} {'ok' if row.ok else 'FAILED'} in {time.monotonic() - t0:.0f} s")
        done.append(row)
    return done


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated rows (default all: {', '.join(ROWS)})")
    parser.add_argument("--events", type=int, default=20_000, help="events per row that streams")
    parser.add_argument("--quick", action="store_true", help="CI size: 2,000 events per row")
    parser.add_argument("--json", type=Path, default=Path("faults.json"))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stream_app.errors import UserError
    from stream_app.transport.broker import EmbeddedBroker

    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = sorted(set(rows) - set(ROWS))
    if unknown:
        raise UserError(f"unknown row(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-faults-"))
    events = 2_000 if args.quick else args.events
    console.print(f"faults: {len(rows)} rows, {events} events per streaming row; logs in {workdir}")
    with EmbeddedBroker() as broker:
        results = run_matrix(broker.bootstrap, rows, events, workdir, console.print)
    table = Table(title="faults: injected into real processes, judged against an offline replay")
    cols = ("fault", "sent", "lost", "duplicated", "differ", "stale", "good_dead_lettered", "crashes", "recover_s", "ok")
    heads = ("fault", "sent", "lost", "dup", "differ", "stale", "good DLQ", "crashes", "recover s", "ok")
    for c, h in zip(cols, heads):
        table.add_column(h, justify="left" if c == "fault" else "right")
    for r in results:
        table.add_row(*(str(getattr(r, c)) for c in cols))
    console.print(table)
    for r in results:
        console.print(f"  {r.fault}: injected {r.injected}")
        for name, passed in r.checks.items():
            console.print(f"  {r.fault}: {name}: {'yes' if passed else 'NO'}")
    args.json.write_text(json.dumps({"events_per_row": events, "rows": [{**asdict(r), "ok": r.ok} for r in results]},
                                    indent=2) + "\n")
    console.print(f"wrote {args.json}")
    return 0 if all(r.ok for r in results) else 1
