"""Hostile input against a live worker: a flood of malformed messages (every kind in
hostile.CASES) interleaved with valid events, redeliveries of recent events and events
for items no catalog or model knows. The worker must not crash, must dead-letter every
bad message once with the reason hostile.CASES expects, and must hold every good event
in its durable state exactly once.

Bad messages are keyed `bad-<n>` and the worker keeps the key on the DLQ record, so
each DLQ record is matched to the message it came from: reason and payload are checked
one by one, not just as totals. Redeliveries replay a user's last 1-3 events in order,
as Kafka does after a crash, so they fall inside the per-user dedupe window and the
user's newest event stays newest; the worker must drop them (counted, not dead-lettered).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import random
import tempfile
import time
from collections import Counter, deque
from pathlib import Path
from typing import Callable, Iterator

from stream_app.config import Settings
from stream_app.pipeline.events import REASONS, encode_event
from stream_app.testing.hostile import malformed

EXAMPLES = """examples:
  streamrec bench hostile --json hostile.json           # 100,000 malformed + 20,000 good + 2,000 redelivered
  streamrec bench hostile --messages 10000 --good 2000 --duplicates 200 --json /tmp/hostile.json
  streamrec bench hostile --model random                # serve a random-weight transformer instead of co-occurrence
"""


def digest(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=8).digest()


class HostileStream:
    """The messages of a run, (value, key) in send order, generated lazily; what each
    message must lead to is recorded as it is generated (100,000 payloads never sit in
    memory at once, only an 8-byte digest of each)."""

    def __init__(self, bad: int, good: int, duplicates: int, users: int = 2_000, items: int = 5_000,
                 seed: int = 0, unknown_share: float = 0.05, dlq_payload_cap: int = 65_536) -> None:
        self.bad, self.good, self.duplicates = bad, good, duplicates
        self.users, self.items, self.seed = users, items, seed
        self.unknown_share, self.cap = unknown_share, dlq_payload_cap
        self.expected_dlq: dict[bytes, tuple[str, bytes]] = {}  # key -> (reason, digest of DLQ payload)
        self.good_events: list[dict] = []  # in send order: what the state must hold (replay)
        self.duplicates_sent = 0
        self.unknown_items = 0

    def reasons(self) -> Counter:
        return Counter(reason for reason, _ in self.expected_dlq.values())

    def __iter__(self) -> Iterator[tuple[bytes, bytes | None]]:
        from stream_app.testing.synth import stream

        rng = random.Random(self.seed)
        events = stream(self.users, self.items, self.seed)
        recent: dict[str, deque[bytes]] = {}  # user -> their last 3 good payloads
        active: deque[str] = deque(maxlen=64)  # users of the latest good events
        bad_left, good_left = self.bad, self.good
        for n in range(self.bad + self.good):
            if rng.random() * (bad_left + good_left) < bad_left:  # uniform interleaving
                bad_left -= 1
                payload, reason = malformed(rng, n)
                key = b"bad-%d" % n
                self.expected_dlq[key] = (reason, digest(payload[:self.cap]))
                yield payload, key
                continue
            good_left -= 1
            event = self._vary(next(events), rng, n)
            user, payload = event["user_id"], encode_event(event)
            self.good_events.append(event)
            recent.setdefault(user, deque(maxlen=3)).append(payload)
            active.append(user)
            yield payload, user.encode()
            # redeliveries, spread evenly over the good events
            due = round(len(self.good_events) * self.duplicates / max(1, self.good)) - self.duplicates_sent
            while due > 0:
                again = rng.choice(active)
                burst = list(recent[again])[-rng.randint(1, min(3, len(recent[again]), due)):]
                for old in burst:
                    yield old, again.encode()
                self.duplicates_sent += len(burst)
                due -= len(burst)

    def _vary(self, event: dict, rng: random.Random, n: int) -> dict:
        """Valid but unusual: items nobody knows (the catalog may lag: keep them), ISO
        timestamps, unknown fields with nested junk (ignored by contract)."""
        if "item_id" in event and rng.random() < self.unknown_share:
            event["item_id"] = f"unknown-{n}"
            self.unknown_items += 1
        r = rng.random()
        if r < 0.05:
            event["ts"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(event["ts"]))
        elif r < 0.10:
            event["extra"] = _JUNK
        return event


_JUNK = {"nested": json.loads("[" * 40 + "]" * 40), "note": "ünïcødé ✓", "n": 10 ** 30}


def wait_processed(worker, stream: HostileStream, timeout: float,
                   say: Callable[[str], None]) -> tuple[bool, dict[str, float]]:
    """Until the worker's metrics account for every message sent (or it died, or timeout);
    returns (caught up, last metrics)."""
    from stream_app.testing.harness import metric_sum

    want = (len(stream.expected_dlq), len(stream.good_events), stream.duplicates_sent)
    deadline = time.monotonic() + timeout
    last_report = 0.0
    while worker.alive():
        try:
            m = worker.metrics()
        except OSError:  # busy or just exited: look again
            time.sleep(1.0)
            continue
        got = (metric_sum(m, "streamrec_invalid_events_total"), metric_sum(m, "streamrec_events_total"),
               m.get("streamrec_duplicate_events_total", 0.0))
        if all(g >= w for g, w in zip(got, want)):  # more than sent is a failure, judged later
            return True, m
        if time.monotonic() > deadline:
            say(f"TIMEOUT after {timeout:.0f} s: processed (bad, good, duplicates) {got}, want {want}")
            return False, m
        if time.monotonic() - last_report > 5:
            last_report = time.monotonic()
            say(f"worker: {got[0]:.0f}/{want[0]} dead-lettered, {got[1]:.0f}/{want[1]} events, "
                f"{got[2]:.0f}/{want[2]} duplicates dropped")
        time.sleep(1.0)
    say(f"worker DIED with exit code {worker.proc.returncode}")
    return False, {}


def audit_dlq(settings: Settings, stream: HostileStream, timeout: float) -> dict:
    """Read the whole DLQ; match each record to the bad message it came from by key."""
    from stream_app.testing.harness import TopicReader

    expected, seen = stream.expected_dlq, Counter()
    reasons, mismatched_reason, mismatched_payload, unexpected = Counter(), 0, 0, 0
    reader = TopicReader(settings.bootstrap_servers, settings.dlq_topic)
    deadline, quiet_since = time.monotonic() + timeout, time.monotonic()
    try:  # until every record is in, then 3 s of quiet to catch extras
        while time.monotonic() < deadline and (sum(seen.values()) + unexpected < len(expected)
                                               or time.monotonic() - quiet_since < 3):
            for r in reader.poll(500):
                quiet_since = time.monotonic()
                reason = dict(r.headers).get("streamrec-reason", b"?").decode()
                reasons[reason] += 1
                if r.key not in expected:
                    unexpected += 1
                    continue
                seen[r.key] += 1
                want_reason, want_digest = expected[r.key]
                mismatched_reason += reason != want_reason
                mismatched_payload += digest(r.value or b"") != want_digest
    finally:
        reader.close()
    return {"dlq": sum(reasons.values()), "dlq_reason_mismatches": mismatched_reason,
            "dlq_payload_mismatches": mismatched_payload, "dlq_missing": len(expected) - len(seen),
            "dlq_repeated": sum(n - 1 for n in seen.values()), "dlq_unexpected": unexpected,
            "dlq_reasons": reasons}


def crash_log(log: Path) -> tuple[list[str], int]:
    """(agent crash lines, tracebacks) in a worker log. Faust restarts a crashed agent,
    so a crash does not end the process: the log is where it shows."""
    lines = log.read_text(errors="replace").splitlines() if log.exists() else []
    return [line for line in lines if "Crashed reason=" in line], sum("Traceback" in line for line in lines)


def run_hostile(settings: Settings, stream: HostileStream, workdir: Path, timeout: float = 1200.0,
                rate: float | None = None, say: Callable[[str], None] = print) -> dict:
    """Send `stream` to a fresh worker, wait until it is worked off, and judge the result."""
    from stream_app.testing.consistency import check
    from stream_app.testing.harness import WorkerProcess, metric_sum
    from stream_app.clients.produce import EventProducer

    log = workdir / "hostile-worker.log"
    worker = WorkerProcess(settings, log).start().wait_ready(120)
    t0 = time.monotonic()
    try:
        producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
        try:
            producer.paced(stream, rate, progress=True)
        finally:
            producer.close()
        produce_s = time.monotonic() - t0
        say(f"sent {producer.sent} messages in {produce_s:.1f} s; waiting for the worker")
        caught_up, m = wait_processed(worker, stream, timeout, say)
        processed_s = time.monotonic() - t0
        patience = 120 if caught_up else 5  # a stalled worker will not deliver more
        dlq = audit_dlq(settings, stream, timeout=patience)
        verdict = check(settings, stream.good_events, timeout=patience)  # reads the changelog once
        alive = worker.alive()
    finally:
        worker.stop()
    crashes, tracebacks = crash_log(log)
    sent_reasons = stream.reasons()
    result = {
        "bad_sent": len(stream.expected_dlq), **{k: v for k, v in dlq.items() if k != "dlq_reasons"},
        "good_sent": len(stream.good_events), "good_in_state": verdict.stored_events,
        "unknown_item_events": stream.unknown_items, "users": verdict.users,
        "state": {k: v for k, v in verdict.to_dict().items() if k not in ("users", "stored_events")},
        "duplicates_sent": stream.duplicates_sent,
        "duplicates_dropped": int(m.get("streamrec_duplicate_events_total", -1)),
        "rekeyed": int(m.get("streamrec_events_rekeyed_total", -1)),
        "events_metric": int(metric_sum(m, "streamrec_events_total")),
        "crashes": int(not alive) + len(crashes), "crash_log": crashes[:5], "tracebacks": tracebacks,
        "seconds": round(processed_s, 1), "produce_seconds": round(produce_s, 1),  # from the first send
        "reasons": {r: {"sent": sent_reasons[r], "dlq": dlq["dlq_reasons"][r],
                        "metric": int(m.get(f'streamrec_invalid_events_total{{reason="{r}"}}', -1))}
                    for r in REASONS},
    }
    result["failures"] = failures(result, verdict.ok)
    return result


def failures(r: dict, state_ok: bool) -> list[str]:
    """Every check of the acceptance criteria that did not hold, in words."""
    checks = [
        (r["crashes"] == 0 and r["tracebacks"] == 0,
         f"{r['crashes']} crashes, {r['tracebacks']} tracebacks in the worker log: {r['crash_log']}"),
        (r["dlq"] == r["bad_sent"], f"DLQ holds {r['dlq']} records, {r['bad_sent']} bad messages sent"),
        (r["dlq_missing"] == r["dlq_repeated"] == r["dlq_unexpected"] == 0,
         f"DLQ: {r['dlq_missing']} missing, {r['dlq_repeated']} repeated, {r['dlq_unexpected']} unexpected"),
        (r["dlq_reason_mismatches"] == 0, f"{r['dlq_reason_mismatches']} DLQ records with the wrong reason"),
        (r["dlq_payload_mismatches"] == 0, f"{r['dlq_payload_mismatches']} DLQ records with altered payload"),
        (all(c["sent"] == c["dlq"] == c["metric"] for c in r["reasons"].values()),
         f"per-reason counts differ: {r['reasons']}"),
        (r["good_in_state"] == r["good_sent"] == r["events_metric"],
         f"{r['good_sent']} good sent, {r['good_in_state']} in state, {r['events_metric']} counted"),
        (state_ok, f"state differs from the replay: {r['state']}"),
        (r["duplicates_dropped"] == r["duplicates_sent"],
         f"{r['duplicates_sent']} redeliveries sent, {r['duplicates_dropped']} dropped"),
        (r["rekeyed"] == 0, f"{r['rekeyed']} events re-keyed (none were mis-keyed)"),
    ]
    return [message for ok, message in checks if not ok]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--messages", type=int, default=100_000, help="malformed messages to send")
    parser.add_argument("--good", type=int, default=20_000, help="valid events interleaved with them")
    parser.add_argument("--duplicates", type=int, default=2_000, help="redeliveries of recent valid events")
    parser.add_argument("--unknown-share", type=float, default=0.05,
                        help="share of valid events whose item is in no catalog or model (they must be kept)")
    parser.add_argument("--users", type=int, default=2_000)
    parser.add_argument("--items", type=int, default=5_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rate", type=float, default=None, help="messages/s (default: as fast as possible)")
    parser.add_argument("--model", default=None,
                        help="checkpoint dir to serve, or 'random' for a random-weight transformer "
                             "(default: the co-occurrence baseline)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds to wait for the worker to catch up")
    parser.add_argument("--json", type=Path, default=Path("hostile.json"))


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from stream_app.testing.checkpoints import random_checkpoint
    from stream_app.transport.broker import EmbeddedBroker
    from stream_app.testing.harness import isolated_settings

    console = Console()
    workdir = Path(tempfile.mkdtemp(prefix="streamrec-hostile-"))
    model = Path(args.model) if args.model else None
    if args.model == "random":
        model = workdir / "model"
        random_checkpoint(model, args.items, dim=64, layers=2, window=50)
    stream = HostileStream(args.messages, args.good, args.duplicates, args.users, args.items, args.seed,
                           args.unknown_share)
    console.print(f"hostile: {args.messages} malformed + {args.good} valid + {args.duplicates} redelivered; "
                  f"engine {model or 'co-occurrence'}; logs in {workdir}")
    with EmbeddedBroker() as broker:
        settings = isolated_settings(broker.bootstrap, "hostile", workdir, model_dir=model)
        result = run_hostile(settings, stream, workdir, args.timeout, args.rate, console.print)
    result["config"] = {k: v for k, v in vars(args).items() if k != "json" and not k.startswith("_bench")}

    table = Table(title="hostile input (one worker)")
    for col in ("what", "sent", "outcome"):
        table.add_column(col, justify="right")
    table.add_row("malformed → DLQ", str(result["bad_sent"]), f"{result['dlq']} "
                  f"({result['dlq_reason_mismatches']} wrong reason)")
    table.add_row("valid → state", str(result["good_sent"]), f"{result['good_in_state']} held once")
    table.add_row("  of which unknown items", str(result["unknown_item_events"]), "kept")
    table.add_row("redelivered → dropped", str(result["duplicates_sent"]), str(result["duplicates_dropped"]))
    table.add_row("crashes", "", str(result["crashes"]))
    table.add_row("seconds, first send → all processed", "", str(result["seconds"]))
    console.print(table)
    by_reason = " · ".join(f"{r} {c['sent']}" for r, c in result["reasons"].items() if c["sent"])
    console.print(f"DLQ reasons: {by_reason}")
    args.json.write_text(json.dumps(result, indent=2, default=str) + "\n")
    status = "all checks hold" if not result["failures"] else "FAILED: " + "; ".join(result["failures"])
    console.print(f"wrote {args.json}; {status}")
    return 0 if not result["failures"] else 1
