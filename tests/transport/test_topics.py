"""Topics streamrec creates: the configured partitions, and the keyed latest-per-key topics
(catalog, recommendations, trending) compacted, so a forgotten user's tombstone erases their
list and only each partition's newest trending snapshot is kept.
The embedded broker does not report topic configs, so the admin client is a recording fake."""
from __future__ import annotations

import kafka

from stream_app.config import Settings
from stream_app.transport.broker import ensure_topics, topic_configs


class RecordingAdmin:
    created: list = []

    def __init__(self, **options) -> None:
        pass

    def list_topics(self) -> list[str]:
        return []

    def create_topics(self, topics) -> None:
        RecordingAdmin.created = list(topics)

    def describe_topics(self, topics) -> list[dict]:
        return []

    def close(self) -> None:
        pass


def test_latest_per_key_topics_are_created_compacted(monkeypatch):
    settings = Settings(bootstrap_servers="127.0.0.1:1", partitions=3)
    monkeypatch.setattr(kafka, "KafkaAdminClient", RecordingAdmin)
    ensure_topics(settings)
    configs = {t.name: t.topic_configs for t in RecordingAdmin.created}
    assert configs == {settings.events_topic: {}, settings.dlq_topic: {},
                       settings.recommendations_topic: {"cleanup.policy": "compact"},
                       settings.catalog_topic: {"cleanup.policy": "compact"},
                       settings.trending_topic: {"cleanup.policy": "compact"}}
    assert {t.num_partitions for t in RecordingAdmin.created} == {3}
    assert topic_configs(settings, settings.events_topic) == {}  # events are never compacted away
