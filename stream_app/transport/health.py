"""Is the broker answering? A worker that silently stalls while Kafka is away looks
exactly like an idle one, so it probes the broker itself and says so.

Behaviour while the broker is lost (docs/operations.md, "Broker trouble"): the Kafka clients keep
retrying; no offsets are committed and no table writes happen, because no events arrive,
so local state stays what the changelog says. `streamrec_broker_up` drops to 0, /readyz
turns 503 (stop routing lookups here) while /healthz stays 200 with the reason
(restarting the worker would not bring Kafka back). When the broker answers again
processing resumes by itself. After `broker_lost_exit_s` without an answer the worker
shuts down (tables flushed and closed) and exits with EXIT_BROKER_LOST, so an
orchestrator can alert and restart it when Kafka is back.
"""
from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time

from stream_app import metrics
from stream_app.config import Settings

log = logging.getLogger(__name__)

EXIT_BROKER_LOST = 3


class BrokerWatch:
    def __init__(self, settings: Settings, clock=time.monotonic) -> None:
        self.settings = settings
        self.clock = clock
        self.last_ok = clock()
        self.up = True
        self.gave_up = False

    def record(self, ok: bool) -> None:
        """One probe's outcome -> state and metrics; decides when to give up."""
        now = self.clock()
        if ok:
            if not self.up:
                log.warning("broker answers again after %.0f s", now - self.last_ok)
            self.last_ok, self.up = now, True
        elif self.up:
            self.up = False
            log.warning("broker %s not answering; retrying", self.settings.bootstrap_servers)
        metrics.BROKER_UP.set(1 if self.up else 0)
        metrics.BROKER_DOWN_SECONDS.set(0 if self.up else now - self.last_ok)
        limit = self.settings.broker_lost_exit_s
        if not self.up and limit > 0 and now - self.last_ok >= limit:
            self.gave_up = True

    def status(self) -> dict:
        if self.up:
            return {"status": "ok", "broker": "up"}
        return {"status": "degraded", "broker": "unreachable", "for_s": round(self.clock() - self.last_ok, 1)}

    async def run(self) -> None:
        """Probe forever (an app task); on giving up, stop the worker like SIGTERM does."""
        client = None
        while not self.gave_up:
            try:
                if client is None:
                    client = self._client()
                    await asyncio.wait_for(client.bootstrap(), self.settings.broker_probe_s * 2)
                await asyncio.wait_for(client.fetch_all_metadata(), self.settings.broker_probe_s * 2)
                self.record(True)
            except asyncio.CancelledError:
                raise
            except Exception:  # any failure to get an answer counts as "not answering"
                self.record(False)
                if client is not None:
                    await _close_quietly(client)
                    client = None
            await asyncio.sleep(self.settings.broker_probe_s)
        self.give_up()

    def give_up(self, grace_s: float = 10.0) -> None:
        """Stop like SIGTERM does; Faust's shutdown can hang retrying a dead broker after
        the tables are closed, so the process is ended after `grace_s` regardless."""
        print(f"streamrec worker: Kafka at {self.settings.bootstrap_servers} unreachable for "
              f"{self.settings.broker_lost_exit_s:.0f} s; stopping (state is intact). Restart it when Kafka is "
              "back, or raise STREAMREC_BROKER_LOST_EXIT_S", file=sys.stderr, flush=True)
        timer = threading.Timer(grace_s, os._exit, args=(EXIT_BROKER_LOST,))
        timer.daemon = True
        timer.start()
        os.kill(os.getpid(), signal.SIGTERM)

    def _client(self):
        from aiokafka.client import AIOKafkaClient

        from stream_app.transport.security import aiokafka_options

        return AIOKafkaClient(bootstrap_servers=self.settings.bootstrap_servers,
                              request_timeout_ms=int(self.settings.broker_probe_s * 2000),
                              **aiokafka_options(self.settings))


async def _close_quietly(client) -> None:
    try:
        await asyncio.wait_for(client.close(), 2)
    except Exception:  # closing a client whose broker is gone may fail; it is dropped anyway
        pass
