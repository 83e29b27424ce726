"""Batches that raise, and the worker's HTTP surface, against a real broker and worker
(docs/design.md, "Poison is isolated", "Only documented pages")."""
from __future__ import annotations

import errno
import urllib.error
import urllib.request

import pytest

from stream_app.clients.produce import EventProducer
from stream_app.errors import UserError
from stream_app.pipeline.failures import Backoff, Rewind, is_environment
from stream_app.runtime import failpoints
from stream_app.testing.consistency import check
from stream_app.testing.harness import TopicReader, WorkerProcess
from stream_app.testing.synth import generate
from stream_app.transport.offsets import OffsetGuard


# ---- pure logic ---------------------------------------------------------------------
def test_environment_failures_are_told_from_data_failures():
    assert is_environment(OSError(errno.ENOSPC, "No space left on device"))
    assert is_environment(MemoryError())
    assert is_environment(Exception("IO error: No space left on device: While appending to file"))
    assert not is_environment(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert not is_environment(RecursionError())
    assert not is_environment(failpoints.InjectedFault("x"))
    assert not is_environment(Exception("some other message"))


def test_backoff_doubles_to_its_cap_and_resets():
    b = Backoff(clock=lambda: 5.0)
    delays = [b.failed(OSError("x")) for _ in range(10)]
    assert delays[:3] == [0.5, 1.0, 2.0] and delays[-1] == 30.0 and b.failing and b.failures == 10
    b.succeeded()
    assert not b.failing and b.failed(OSError("x")) == 0.5


def test_rewind_spans_each_partition():
    assert Rewind.of([(0, 7), (1, 3), (0, 8), (1, 2)]).spans == {0: (7, 8), 1: (2, 3)}


def test_failpoint_specs_parse_or_fail_in_one_line():
    assert failpoints.parse("batch=raise@20, other=enospc@3") == {"batch": ("raise", 20), "other": ("enospc", 3)}
    for bad in ("batch", "batch=boom@2", "batch=raise@0", "batch=raise@x"):
        with pytest.raises(ValueError, match="STREAMREC_FAILPOINTS"):
            failpoints.parse(bad)


def test_failpoint_raises_every_nth_pass(monkeypatch):
    monkeypatch.setattr(failpoints, "_POINTS", {"p": ("enospc", 3)})
    monkeypatch.setattr(failpoints, "_HITS", {})
    raised = []
    for _ in range(9):
        try:
            failpoints.hit("p")
            raised.append(False)
        except OSError as exc:
            raised.append(exc.errno == errno.ENOSPC)
    assert raised == [False, False, True] * 3
    failpoints.hit("unset")  # a failpoint that is not set does nothing


def test_a_rewound_partition_holds_commits_until_its_reread_is_processed():
    g = OffsetGuard()
    g.new_generation(1)
    for o in range(10, 20):
        g.admit(0, o)
    g.rewind(0, 10, 19)  # the batch 10..19 failed
    assert g.admit(0, 20) == (False, None)  # fetched before the seek: read again later
    assert g.admit(0, 10) == (True, None)  # the re-read arrives: the hole closes ...
    assert g.held[0] == (10, 19)  # ... but commits stay held until it is written
    g.processed(0, 15)
    assert 0 in g.held
    g.processed(0, 19)
    assert 0 not in g.held


# ---- live ---------------------------------------------------------------------------
@pytest.mark.integration
@pytest.mark.parametrize("spec,kind", [("batch=raise@3", "data"), ("batch=enospc@3", "environment")])
def test_a_failing_batch_loses_and_dead_letters_nothing(make_settings, tmp_path, spec, kind):
    """Every 3rd batch raises. A data-class failure is retried event by event, an
    environmental one is read again after a backoff: either way every event is stored
    once, in order, and nothing good reaches the dead-letter topic."""
    settings = make_settings(batch_max=50)
    worker = WorkerProcess(settings, tmp_path / "worker.log", {"STREAMREC_FAILPOINTS": spec}).start().wait_ready()
    try:
        events, _ = generate(users=80, items=200, events=1500, seed=4)
        producer = EventProducer(settings.bootstrap_servers, settings.events_topic)
        producer.paced(((ev, key) for ev, key in map(_message, events)), rate=1500)
        producer.close()
        verdict = check(settings, events, timeout=90)
        assert verdict.ok, verdict.to_dict()
        m = worker.metrics()
        assert m[f'streamrec_batch_failures_total{{kind="{kind}"}}'] >= 3
        assert m['streamrec_invalid_events_total{reason="processing_error"}'] == 0
        assert worker.alive()
    finally:
        worker.stop()


def _message(event: dict) -> tuple[bytes, bytes]:
    import json
    return json.dumps(event).encode(), event["user_id"].encode()


@pytest.mark.integration
def test_a_huge_key_is_dead_lettered_with_its_key_cut_and_the_worker_goes_on(make_settings, start_worker):
    settings = make_settings()
    worker = start_worker(settings)
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic, {"max_request_size": 4 << 20})
    producer.send(b"not json", key=b"k" * 900_000)
    good, _ = generate(users=5, items=20, events=40, seed=2)
    for e in good:
        producer.send_event(e)
    producer.close()
    producer.check()
    dlq = TopicReader(settings.bootstrap_servers, settings.dlq_topic)
    dead = dlq.read_until(lambda rs: len(rs) >= 1, timeout=60)
    dlq.close()
    assert len(dead[0].key) == 1024 and dict(dead[0].headers)["streamrec-truncated"] == b"1"
    assert check(settings, good, timeout=60).ok and worker.alive()


@pytest.mark.integration
def test_only_documented_pages_answer(make_settings, start_worker):
    """Faust's /table (users' raw histories), /router, /graph, /stats and / are not served."""
    settings = make_settings()
    worker = start_worker(settings)
    assert settings.web_host == "127.0.0.1"  # the default listener is loopback
    for path in ("/metrics", "/healthz", "/readyz"):
        assert _status(worker, path) == 200, path
    assert _status(worker, "/recommendations/nobody") == 200  # the fallback (tests/pipeline/test_lookup.py)
    assert _status(worker, "/surfaces/similar?item_id=nobody") == 200  # tests/pipeline/test_surfaces_page.py
    for path in ("/", "/table/", "/table/users/", "/table/users/u1/", "/router/", "/router/users/",
                 "/graph/", "/stats/", "/performance/", "/signal/", "/metrics/extra", "/../etc/passwd"):
        assert _status(worker, path) == 404, path


def _status(worker: WorkerProcess, path: str) -> int:
    try:
        with urllib.request.urlopen(worker.base_url + path, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_a_refused_send_is_a_one_line_error(broker):
    producer = EventProducer(broker.bootstrap, "refused-topic", {"max_request_size": 1024})
    producer.send(b"x" * 4096, key=b"u1")
    producer.close()
    with pytest.raises(UserError, match="1 of 1 messages were not written"):
        producer.check()


def test_a_wildcard_bind_address_is_never_advertised():
    import socket

    from stream_app.config import Settings
    from stream_app.pipeline.app import advertised_host
    assert advertised_host(Settings(web_host="127.0.0.1")) == "127.0.0.1"
    assert advertised_host(Settings(web_host="0.0.0.0")) == socket.gethostname()
    assert advertised_host(Settings(web_host="0.0.0.0", web_advertised_host="worker-3")) == "worker-3"
