"""`streamrec produce` as other services use it: files go out keyed by user_id (bad lines
too, unkeyed, for the worker to dead-letter), catalog rows keyed by item_id, and a
catalog file that is not one is a one-line error naming the line."""
from __future__ import annotations

import json

import pytest

from stream_app.cli import main
from stream_app.clients.produce import catalog_messages, file_messages
from stream_app.errors import UserError
from stream_app.testing.harness import TopicReader
from stream_app.transport.broker import ensure_topics


def write_lines(path, *lines: str):
    path.write_text("\n".join(lines) + "\n")
    return path


def test_file_lines_keep_their_bytes_and_key_by_user(tmp_path):
    good = json.dumps({"event_id": "e1", "user_id": "u7", "type": "click", "item_id": "i1", "ts": 1})
    path = write_lines(tmp_path / "events.jsonl", good, "", "not json", '{"user_id": 42}')
    assert list(file_messages(path)) == [(good.encode(), b"u7"), (b"not json", None), (b'{"user_id": 42}', b"42")]


def test_catalog_rows_key_by_item_and_name_a_bad_line(tmp_path):
    path = write_lines(tmp_path / "catalog.jsonl", '{"item_id": "i1", "title": "mug"}', '{"title": "no id"}')
    rows = catalog_messages(path)
    assert next(rows)[1] == b"i1"
    with pytest.raises(UserError, match=r"catalog.jsonl:2 is not a catalog row"):
        next(rows)


@pytest.mark.integration
def test_produce_file_reaches_the_topic_keyed_by_user(make_settings, tmp_path):
    settings = make_settings()
    ensure_topics(settings)
    topic, bootstrap = settings.events_topic, settings.bootstrap_servers
    events = [{"event_id": f"e{n}", "user_id": f"u{n % 3}", "type": "view", "item_id": f"i{n}", "ts": n}
              for n in range(30)]
    path = write_lines(tmp_path / "events.jsonl", *map(json.dumps, events))
    assert main(["produce", "--file", str(path), "--bootstrap-servers", bootstrap,
                 "--events-topic", topic]) == 0
    records = TopicReader(bootstrap, topic).read_until(lambda r: len(r) >= 30, timeout=30)
    assert sorted((r.key, json.loads(r.value)["event_id"]) for r in records) == \
        sorted((e["user_id"].encode(), e["event_id"]) for e in events)


@pytest.mark.integration
@pytest.mark.parametrize("idempotence,expected", [("auto", "off"), ("on", "on"), ("off", "off")])
def test_idempotence_auto_is_off_on_the_embedded_broker_and_on_is_honoured(make_settings, tmp_path, capsys,
                                                                           idempotence, expected):
    """`auto` knows the embedded broker (Tansu) and leaves idempotence off there; `on` is
    honoured: Tansu gives kafka-python a producer id (docs/facts.md), and every event lands
    once either way."""
    settings = make_settings()
    ensure_topics(settings)
    topic, bootstrap = settings.events_topic, settings.bootstrap_servers
    events = [{"event_id": f"e{n}", "user_id": f"u{n % 4}", "type": "view", "item_id": f"i{n}", "ts": n}
              for n in range(40)]
    path = write_lines(tmp_path / "events.jsonl", *map(json.dumps, events))
    assert main(["produce", "--file", str(path), "--bootstrap-servers", bootstrap, "--events-topic", topic,
                 "--idempotence", idempotence]) == 0
    assert f"40 messages sent to {topic} at {bootstrap} (idempotence {expected})" in capsys.readouterr().out
    records = TopicReader(bootstrap, topic).read_until(lambda r: len(r) >= 40, timeout=30)
    assert sorted(json.loads(r.value)["event_id"] for r in records) == sorted(e["event_id"] for e in events)


@pytest.mark.integration
def test_a_broker_that_cannot_take_idempotence_is_one_line_naming_the_flag(broker):
    """kafka-python refuses an idempotent producer for a broker older than Kafka 0.11; a
    pinned api_version stands in for such a broker (the embedded one answers as 3.x)."""
    from stream_app.clients.produce import open_producer

    old_broker = {"api_version": (0, 10, 2)}
    with pytest.raises(UserError) as err:
        open_producer(broker.bootstrap, "any-topic", old_broker, "on")
    message = str(err.value)
    assert "\n" not in message and "cannot take an idempotent producer" in message
    assert message.endswith("pass --idempotence off")
    producer = open_producer(broker.bootstrap, "any-topic", old_broker, "off")  # the fix it names works
    assert not producer.idempotent
    producer.close()
