"""Kafka TLS/SASL settings reach every client, secrets stay secret, bad settings are one line.

The integration tests run real clients and a real worker over TLS. Tansu 0.6 cannot serve
TLS itself (its CLI puts --cert and --key in one clap group, so giving both is rejected
and giving one leaves TLS off), so a TLS-terminating proxy that requires a client
certificate sits in front of it and Tansu advertises the proxy: every connection a client
makes, bootstrap or partition leader, is TLS with the chain and host name verified.
SASL is covered by the mapping tests only: Tansu's --authentication cannot be given users
with memory storage (creating one needs an authenticated session), so no SASL handshake
runs here.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from stream_app.config import Settings, add_settings_arguments, settings_from_args
from stream_app.errors import UserError
from stream_app.transport.security import aiokafka_options, faust_credentials, kafka_python_options, ssl_context

SECRET = "hunter2-not-in-logs"


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl CLI not found")
    d = tmp_path_factory.mktemp("pki")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=streamrec test CA")
    for name, ext in (("server", "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n"),
                      ("client", "extendedKeyUsage=clientAuth\n")):
        (d / f"{name}.ext").write_text(ext)
        openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN=streamrec {name}")
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext")
    return {p.stem if p.suffix == ".pem" else p.name: p for p in d.iterdir()}


def sasl_ssl(pki, **overrides) -> Settings:
    return Settings(**{"bootstrap_servers": "kafka:9093", "security_protocol": "SASL_SSL", "sasl_mechanism":
                       "SCRAM-SHA-512", "sasl_username": "svc", "sasl_password": SECRET,
                       "ssl_cafile": pki["ca"], **overrides})


# ------------------------------------------------------------------------------ mapping

def test_plaintext_adds_nothing_anywhere():
    from stream_app.pipeline.app import faust_settings

    settings = Settings(bootstrap_servers="kafka:9092")
    assert kafka_python_options(settings) == {} and aiokafka_options(settings) == {}
    assert ssl_context(settings) is None and faust_credentials(settings) is None
    assert "broker_credentials" not in faust_settings(settings)


def test_ssl_maps_to_one_verifying_context(pki):
    settings = Settings(bootstrap_servers="kafka:9093", security_protocol="SSL", ssl_cafile=pki["ca"],
                        ssl_certfile=pki["client"], ssl_keyfile=pki["client.key"])
    opts = kafka_python_options(settings)
    assert set(opts) == {"security_protocol", "ssl_context"} and opts["security_protocol"] == "SSL"
    ctx = opts["ssl_context"]
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    assert ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert [dict(x[0] for x in c["subject"])["commonName"] for c in ctx.get_ca_certs()] == ["streamrec test CA"]
    assert set(aiokafka_options(settings)) == set(opts)
    relaxed = settings.model_copy(update={"ssl_check_hostname": False})
    assert not ssl_context(relaxed).check_hostname and ssl_context(relaxed).verify_mode == ssl.CERT_REQUIRED


@pytest.mark.parametrize("protocol,mechanism", [("SSL", None), ("SASL_PLAINTEXT", "PLAIN"),
                                                ("SASL_SSL", "SCRAM-SHA-256"), ("SASL_SSL", "SCRAM-SHA-512")])
def test_each_protocol_reaches_faust_and_both_clients(pki, protocol, mechanism):
    """Through Faust's own credentials -> aiokafka translation, as its consumer and producer use it."""
    import faust
    from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth

    from stream_app.pipeline.app import faust_settings

    sasl = protocol.startswith("SASL_")
    settings = Settings(bootstrap_servers="kafka:9093", security_protocol=protocol,
                        **({"sasl_mechanism": mechanism, "sasl_username": "svc", "sasl_password": SECRET}
                           if sasl else {}),
                        **({"ssl_cafile": pki["ca"]} if protocol.endswith("SSL") else {}))
    conf = faust_settings(settings)
    creds = conf["broker_credentials"]
    assert isinstance(creds, faust.SASLCredentials if sasl else faust.SSLCredentials)
    faust_kwargs = credentials_to_aiokafka_auth(creds)
    ours = aiokafka_options(settings)
    assert faust_kwargs["security_protocol"] == ours["security_protocol"] == protocol
    assert (faust_kwargs.get("ssl_context") is not None) == ("ssl_context" in ours) == protocol.endswith("SSL")
    if sasl:
        for key in ("sasl_mechanism", "sasl_plain_username", "sasl_plain_password"):
            assert faust_kwargs[key] == ours[key] == kafka_python_options(settings)[key]
        assert ours["sasl_mechanism"] == mechanism and ours["sasl_plain_password"] == SECRET
    app = faust.App("sec-test", **conf)  # Faust accepts them as configuration
    assert app.conf.broker_credentials is creds


def test_secret_never_in_repr_logs_or_json_but_reaches_child_processes(pki):
    from stream_app.testing.harness import settings_env

    settings = sasl_ssl(pki)
    for text in (repr(settings), str(settings), settings.model_dump_json(), repr(faust_credentials(settings))):
        assert SECRET not in text
    env = settings_env(settings)
    assert env["STREAMREC_SASL_PASSWORD"] == SECRET and env["STREAMREC_SSL_CAFILE"] == str(pki["ca"])
    # a child process rebuilds the same settings from that environment
    out = subprocess.run([sys.executable, "-c", "from stream_app.config import Settings; s = Settings(); "
                          "print(s.security_protocol, s.sasl_mechanism, s.sasl_password.get_secret_value())"],
                         env={**env, "PATH": ""}, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["SASL_SSL", "SCRAM-SHA-512", SECRET]


def test_env_vars_are_read_case_insensitively(monkeypatch, pki):
    for name, value in {"BOOTSTRAP_SERVERS": "kafka:9093", "SECURITY_PROTOCOL": "sasl_ssl",
                        "SASL_MECHANISM": "scram-sha-256", "SASL_USERNAME": "svc", "SASL_PASSWORD": SECRET,
                        "SSL_CAFILE": str(pki["ca"]), "SSL_CHECK_HOSTNAME": "false"}.items():
        monkeypatch.setenv(f"STREAMREC_{name}", value)
    settings = Settings()
    assert (settings.security_protocol, settings.sasl_mechanism) == ("SASL_SSL", "SCRAM-SHA-256")
    assert settings.ssl_cafile == pki["ca"] and settings.ssl_check_hostname is False
    assert settings.sasl_password.get_secret_value() == SECRET


def _from_flags(*argv: str) -> Settings:
    parser = argparse.ArgumentParser()
    add_settings_arguments(parser)
    return settings_from_args(parser.parse_args(list(argv)))


@pytest.mark.parametrize("argv,fix", [
    (["--security-protocol", "TLS"], "STREAMREC_SECURITY_PROTOCOL"),
    (["--security-protocol", "SASL_SSL"], "STREAMREC_SASL_USERNAME and STREAMREC_SASL_PASSWORD"),
    (["--security-protocol", "SASL_PLAINTEXT", "--sasl-username", "svc"], "STREAMREC_SASL_PASSWORD"),
    (["--sasl-username", "svc", "--sasl-password", SECRET], "STREAMREC_SECURITY_PROTOCOL=SASL_SSL"),
    (["--security-protocol", "SASL_SSL", "--sasl-mechanism", "GSSAPI", "--sasl-username", "u",
      "--sasl-password", "p"], "STREAMREC_SASL_MECHANISM"),
    (["--security-protocol", "SSL", "--ssl-cafile", "/nonexistent/ca.pem"], "STREAMREC_SSL_CAFILE"),
    (["--ssl-cafile", "{ca}"], "STREAMREC_SECURITY_PROTOCOL=SSL"),
    (["--security-protocol", "SSL", "--ssl-keyfile", "{ca}"], "STREAMREC_SSL_CERTFILE"),
    (["--security-protocol", "SSL", "--bootstrap-servers", ""], "STREAMREC_BOOTSTRAP_SERVERS"),
])
def test_bad_combinations_are_one_line_user_errors(pki, argv, fix):
    argv = [a.replace("{ca}", str(pki["ca"])) for a in argv]
    if "--bootstrap-servers" not in argv:
        argv += ["--bootstrap-servers", "kafka:9093"]
    with pytest.raises(UserError) as info:
        _from_flags(*argv)
    message = str(info.value)
    assert fix in message and "\n" not in message and SECRET not in message


def test_unusable_pem_files_name_the_setting(pki, tmp_path):
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    with pytest.raises(UserError, match="ssl_cafile .*STREAMREC_SSL_CAFILE"):
        ssl_context(Settings(bootstrap_servers="k:1", security_protocol="SSL", ssl_cafile=garbage))
    encrypted = tmp_path / "encrypted.key"
    subprocess.run(["openssl", "pkey", "-in", pki["client.key"], "-aes256", "-passout", "pass:x", "-out", encrypted],
                   check=True, capture_output=True)
    with pytest.raises(UserError, match="encrypted"):  # never an interactive passphrase prompt
        ssl_context(Settings(bootstrap_servers="k:1", security_protocol="SSL", ssl_certfile=pki["client"],
                             ssl_keyfile=encrypted))


def test_cli_reports_bad_security_settings_in_one_line():
    result = subprocess.run([sys.executable, "-m", "stream_app.cli", "produce", "--synthetic",
                             "--bootstrap-servers", "127.0.0.1:1", "--security-protocol", "SASL_SSL",
                             "--sasl-username", "svc"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and "STREAMREC_SASL_PASSWORD" in result.stderr


# -------------------------------------------------------------------- real TLS (integration)

class TlsProxy:
    """TLS listener in front of a plaintext broker: handshake (client certificate required),
    then bytes both ways. Counts completed handshakes, so a test can see its clients used TLS."""

    def __init__(self, pki: dict[str, Path], upstream_port: int) -> None:
        from stream_app.transport.broker import free_port

        self.port, self.upstream_port, self.handshakes = free_port(), upstream_port, 0
        self.ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki["ca"]))
        self.ctx.verify_mode = ssl.CERT_REQUIRED
        self.ctx.load_cert_chain(pki["server"], pki["server.key"])
        self.loop = asyncio.new_event_loop()
        self.loop.set_exception_handler(lambda loop, context: None)  # failed handshakes are expected in tests
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port, ssl=self.ctx), self.loop).result(10)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.handshakes += 1  # start_server calls us only after a completed handshake
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, ssl.SSLError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def tls_broker(pki):
    """Tansu on a private plaintext port, advertising the TLS proxy as its address."""
    from stream_app.transport.broker import free_port, spawn, stop_process, tansu_binary

    port = free_port()
    proxy = TlsProxy(pki, port)
    proc = spawn([tansu_binary(), "broker", "--listener-url", f"tcp://127.0.0.1:{port}",
                  "--advertised-listener-url", f"tcp://{proxy.bootstrap}", "--storage-engine", "memory://tansu/"],
                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        yield proxy
    finally:
        stop_process(proc)
        proxy.close()


def tls_settings(pki, bootstrap: str, **overrides) -> dict:
    return {"bootstrap_servers": bootstrap, "security_protocol": "SSL", "ssl_cafile": pki["ca"],
            "ssl_certfile": pki["client"], "ssl_keyfile": pki["client.key"], **overrides}


@pytest.mark.integration
def test_our_helpers_create_produce_and_consume_over_tls(pki, tls_broker, tmp_path):
    from stream_app.transport.broker import ensure_topics, is_tansu, wait_for_broker
    from stream_app.testing.harness import TopicReader
    from stream_app.clients.produce import EventProducer

    settings = Settings(**tls_settings(pki, tls_broker.bootstrap, events_topic="tls.events", partitions=2))
    options = kafka_python_options(settings)
    before = tls_broker.handshakes
    wait_for_broker(settings.bootstrap_servers, 20, options)
    assert is_tansu(settings.bootstrap_servers, options)
    ensure_topics(settings, [settings.events_topic])
    producer = EventProducer(settings.bootstrap_servers, settings.events_topic, options)
    for n in range(20):
        producer.send_event({"event_id": f"e{n}", "user_id": f"u{n % 3}", "type": "view", "item_id": "i1",
                             "ts": 1.0})
    producer.close()
    reader = TopicReader(settings.bootstrap_servers, settings.events_topic, options)
    records = reader.read_until(lambda rs: len(rs) >= 20, timeout=20)
    reader.close()
    assert sorted(json.loads(r.value)["event_id"] for r in records) == sorted(f"e{n}" for n in range(20))
    assert tls_broker.handshakes > before


@pytest.mark.integration
@pytest.mark.parametrize("overrides,reason", [  # PLAINTEXT client vs TLS listener; CA not trusted; no client cert
    ({"security_protocol": "PLAINTEXT", "ssl_cafile": None, "ssl_certfile": None, "ssl_keyfile": None},
     "security_protocol=PLAINTEXT"),
    ({"ssl_cafile": None}, "TLS: self-signed certificate in certificate chain"),
    ({"ssl_certfile": None, "ssl_keyfile": None}, "client certificate required?"),
])
def test_wrong_tls_settings_fail_in_one_line_with_the_reason(pki, tls_broker, overrides, reason):
    """Bounded by the timeout (kafka-python alone would block 30 s) and naming what TLS said."""
    from stream_app.transport.broker import wait_for_broker

    settings = Settings(**tls_settings(pki, tls_broker.bootstrap, **overrides))
    started = time.monotonic()
    with pytest.raises(UserError) as info:
        wait_for_broker(settings.bootstrap_servers, 2, kafka_python_options(settings))
    message = str(info.value)
    assert reason in message and "STREAMREC_SECURITY_PROTOCOL" in message and "\n" not in message
    assert time.monotonic() - started < 10


@pytest.mark.integration
def test_worker_serves_over_tls(pki, tls_broker, tmp_path):
    """A real worker subprocess whose every client (Faust, catalog reader, admin) speaks TLS."""
    from stream_app.testing.harness import TopicReader, WorkerProcess, isolated_settings, metric_sum
    from stream_app.clients.produce import EventProducer

    settings = isolated_settings(tls_broker.bootstrap, "tls", tmp_path,
                                 **tls_settings(pki, tls_broker.bootstrap, partitions=2, batch_wait_ms=20))
    options = kafka_python_options(settings)
    before = tls_broker.handshakes
    worker = WorkerProcess(settings, tmp_path / "worker.log").start()
    try:
        worker.wait_ready(90)
        assert tls_broker.handshakes > before + 2, worker.log_tail()
        catalog = EventProducer(settings.bootstrap_servers, settings.catalog_topic, options)
        catalog.send(json.dumps({"item_id": "i9", "title": "t", "available": True}).encode(), b"i9")
        catalog.close()
        producer = EventProducer(settings.bootstrap_servers, settings.events_topic, options)
        users = {f"u{n}" for n in range(10)}
        for n in range(60):
            producer.send_event({"event_id": f"e{n}", "user_id": f"u{n % 10}", "type": "view",
                                 "item_id": f"i{n % 7}", "ts": time.time()})
        producer.close()
        reader = TopicReader(settings.bootstrap_servers, settings.recommendations_topic, options)
        served = {json.loads(r.value)["user_id"] for r in reader.read_until(
            lambda rs: users <= {json.loads(r.value)["user_id"] for r in rs}, timeout=60)}
        reader.close()
        assert users <= served, worker.log_tail()
        deadline = time.monotonic() + 20  # the catalog row arrived through the worker's aiokafka reader
        while metric_sum(worker.metrics(), "streamrec_catalog_items") < 1 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert metric_sum(worker.metrics(), "streamrec_catalog_items") >= 1, worker.log_tail()
        assert worker.metrics().get("streamrec_broker_up", 1.0) == 1.0  # its broker probe speaks TLS too
        assert SECRET not in worker.log_path.read_text()
    finally:
        worker.stop()
