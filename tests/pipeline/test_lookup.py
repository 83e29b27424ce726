"""The lookup API against real workers: after a restart and after a rebalance every user
with history gets the list the recommendations topic last carried (forwarded to the owner
from any worker, one at a time or in a batch), a new or forgotten user gets the fallback,
every answer and topic record validates against the published schemas, and no hostile
request does more than earn a 4xx (docs/design.md, "Lookups survive restarts")."""
from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest

from stream_app.clients.forget import forget_event
from stream_app.clients.produce import EventProducer
from stream_app.testing.harness import TopicReader, WorkerProcess
from stream_app.testing.synth import generate
from stream_app.transport.broker import free_port
from tests.contract_schemas import component, errors, record
from tests.helpers import wait_until

pytestmark = pytest.mark.integration


def produce(settings, events) -> None:
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
    for e in events:
        producer.send_event(e)
    producer.close()


def topic_latest(settings, events: list[dict], timeout: float = 60) -> dict[str, dict | None]:
    """Each user's last record on the recommendations topic (None: a tombstone), once every
    user's reflects their newest event; checks each record's schema and partition."""
    newest = {e["user_id"]: e["event_id"] for e in events}
    deadline = time.monotonic() + timeout
    while True:
        reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic)
        records = reader.read_to_end()
        reader.close()
        latest, partition = {}, {}
        for r in records:
            user = r.key.decode()
            assert partition.setdefault(user, r.partition) == r.partition, f"{user}'s records on two partitions"
            latest[user] = None if r.value is None else json.loads(r.value)
        if all(newest[u] == "forgotten" or (latest.get(u) or {}).get("event_id") == eid for u, eid in newest.items()):
            break
        assert time.monotonic() < deadline, "recommendations did not catch up with the events"
        time.sleep(0.5)
    events_reader = TopicReader(settings.bootstrap_servers, settings.events_topic)
    event_partition = {r.key.decode(): r.partition for r in events_reader.read_to_end()}
    events_reader.close()
    for user, rec in latest.items():
        assert partition[user] == event_partition[user], "a user's recommendations left their events' partition"
        if rec is not None:
            assert not errors(record("recommendation"), rec), rec
    return latest


def get(worker: WorkerProcess, path: str) -> tuple[int, dict]:
    try:
        with urllib.request.urlopen(worker.base_url + path, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        body = exc.read()
        return exc.code, json.loads(body) if exc.headers.get_content_type() == "application/json" else {"text": body}


def post(worker: WorkerProcess, body: bytes) -> tuple[int, dict]:
    req = urllib.request.Request(worker.base_url + "/recommendations", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read() or b"{}")


def lookup(worker: WorkerProcess, user: str, query: str = "") -> dict:
    status, body = get(worker, f"/recommendations/{urllib.parse.quote(user, safe='')}{query}")
    assert status == 200, (user, status, body)
    assert not errors(component("Lookup"), body), body
    return body


def assert_serves_the_topic(worker: WorkerProcess, latest: dict[str, dict | None]) -> None:
    """100% of users with a list get exactly it; forgotten ones get the fallback."""
    wrong = []
    for user, rec in latest.items():
        body = lookup(worker, user)
        if rec is None:
            ok = body["source"] == "fallback"
        else:
            ok = body["source"] == "published" and {k: body[k] for k in rec if k != "schema_version"} == \
                {k: v for k, v in rec.items() if k != "schema_version"}
        if not ok:
            wrong.append(user)
    assert not wrong, f"{len(wrong)} of {len(latest)} lookups differ from the topic, e.g. {wrong[:3]}"


def test_lookups_survive_a_restart_and_forget(make_settings, start_worker):
    settings = make_settings()
    worker = start_worker(settings, "a")
    events, _ = generate(users=60, items=80, events=900, seed=5)
    produce(settings, events)
    latest = topic_latest(settings, events)
    assert_serves_the_topic(worker, latest)

    new = lookup(worker, "nobody-yet")
    assert new["source"] == "fallback" and new["model_version"] == "cooccurrence-v1" and new["items"]
    gone = events[-1]["user_id"]
    produce(settings, [forget_event(gone)])
    wait_until(lambda: lookup(worker, gone)["source"] == "fallback", 30, "the forget to reach the lookup")

    worker.stop()
    worker = start_worker(settings, "a-again")
    latest = topic_latest(settings, events + [{"user_id": gone, "event_id": "forgotten"}])
    assert latest[gone] is None
    assert_serves_the_topic(worker, latest)

    user = events[0]["user_id"]
    items = [i["item_id"] for i in latest[user]["items"]]
    cut = lookup(worker, user, f"?k=2&exclude={urllib.parse.quote(items[0])}")
    assert [i["item_id"] for i in cut["items"]] == items[1:3] and cut["k"] == 2 and cut["complete"]


def test_lookups_survive_a_rebalance_from_any_worker(make_settings, start_worker, tmp_path):
    a_settings = make_settings(partitions=4)
    b_settings = a_settings.model_copy(update={"state_dir": tmp_path / "state-b", "web_port": free_port()})
    a = start_worker(a_settings, "a")
    events, _ = generate(users=80, items=80, events=1200, seed=6)
    produce(a_settings, events)
    latest = topic_latest(a_settings, events)
    b = start_worker(b_settings, "b")  # joins: a loses two partitions, b reads their recommendations
    wait_until(lambda: len(a.partitions()) == 2 and len(b.partitions()) == 2, 60, "the two workers to split 4 partitions")
    a.wait_ready(30), b.wait_ready(30)
    for worker in (a, b):  # each answers its own users and forwards the others' to their owner
        assert_serves_the_topic(worker, latest)

    users = sorted(latest)
    status, body = post(b, json.dumps({"user_ids": users[:100], "k": 3}).encode())
    assert status == 200 and not errors(component("BatchResponse"), body)
    assert [r["user_id"] for r in body["results"]] == users[:100]
    for r in body["results"]:
        assert r["source"] == "published" and r["items"] == latest[r["user_id"]]["items"][:3], r


def test_hostile_requests_get_a_4xx_and_the_worker_goes_on(make_settings, start_worker):
    settings = make_settings()
    worker = start_worker(settings)
    for path, status in [("/recommendations/u1?k=0", 400), ("/recommendations/u1?k=abc", 400),
                         ("/recommendations/u1?k=" + "9" * 3000, 400), ("/recommendations/u1?top=3", 400),
                         ("/recommendations/" + "u" * 200, 400), ("/recommendations/u%ED%A0%80", 200),  # not UTF-8: kept literally
                        
                         ("/recommendations/u1?exclude=" + ",".join(["i"] * 300), 400),
                         ("/recommendations/a%2Fb/c", 404)]:
        code, body = get(worker, path)
        assert code == status, (path, code, body)
        if code == 400:
            assert not errors(component("Error"), body) and "\n" not in body["error"], body
    for body, status in [(b"not json", 400), (b"[" * 100_000, 413), (b'{"user_ids": []}', 400),
                         (json.dumps({"user_ids": [f"u{n}" for n in range(101)]}).encode(), 400),
                         (json.dumps({"user_ids": ["u" * 10_000]}).encode(), 400),
                         (b'{"user_ids": ["a"], "k": 1e400}', 400), (b"\x00" * 1000, 400)]:
        code, answer = post(worker, body)
        assert code == status and "error" in answer, (body[:40], code, answer)
    conn = http.client.HTTPConnection(settings.web_host, settings.web_port, timeout=10)
    conn.putrequest("POST", "/recommendations")
    conn.putheader("Content-Length", str(50 << 20))  # announced 50 MB: refused before it is read
    conn.endheaders()
    assert conn.getresponse().status == 413
    conn.close()
    assert get(worker, "/recommendations/u1?k=1")[0] == 200
    assert worker.alive() and get(worker, "/healthz")[0] == 200


def test_batch_entries_and_capped_bodies():
    """A batch entry is the lookup's body, or the user's status and error; a body past the
    cap is refused however it is sent (announced length or not)."""
    import asyncio

    from stream_app.pipeline.pages import read_capped, result
    from stream_app.serving.lookup import BadRequest

    assert result("u1", 200, b'{"user_id": "u1", "items": []}') == {"user_id": "u1", "items": []}
    assert result("u1", 503, {"error": "retry"}) == {"user_id": "u1", "status": 503, "error": "retry"}
    assert result("u1", 200, b"<html>")["status"] == 502

    class Stream:
        def __init__(self, data: bytes) -> None:
            self.data = data

        async def read(self, n: int) -> bytes:
            chunk, self.data = self.data[:n], self.data[n:]
            return chunk

    class Request:
        def __init__(self, data: bytes, length: int | None) -> None:
            self.content, self.content_length = Stream(data), length

    assert asyncio.run(read_capped(Request(b"x" * 100, None), 100)) == b"x" * 100
    for length in (None, 101):
        with pytest.raises(BadRequest) as info:
            asyncio.run(read_capped(Request(b"x" * 101, length), 100))
        assert info.value.status == 413
