"""Faust's aiokafka transport with one change: a configurable fetch wait.

Faust hard-codes fetch_max_wait_ms=1500. Kafka answers a fetch as soon as data arrives,
so that is harmless there, but Tansu (the embedded broker) answers only when the wait
expires: measured p50 event latency 386 ms at 1500 ms, 32 ms at 100 ms, 12 ms at 20 ms.
"""
from __future__ import annotations

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport):
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.app.fetch_max_wait_ms  # read by the Fetcher at start()
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class App(faust.App):
    """faust.App whose consumer uses `fetch_max_wait_ms` (set before the worker starts)."""

    fetch_max_wait_ms: int = 1500

    def _new_transport(self):
        return _Transport(self.conf.broker_consumer, self)
