"""Kafka security settings -> client arguments, in one place.

The app talks to Kafka through three client libraries: Faust (aiokafka underneath) for
the worker's consumer, producer and topic creation, aiokafka for the catalog reader, and
kafka-python for admin (wait, create topics, detect Tansu), the producer CLI and the test
and benchmark readers. Each spells TLS and SASL differently; if each call site built its
own arguments, one forgotten client would quietly talk PLAINTEXT or fail to connect. So
every client gets its arguments from here, and PLAINTEXT maps to nothing at all: an
unsecured deployment creates exactly the clients it created before this module existed.

One `ssl.SSLContext` carries all TLS settings (CA, client certificate, hostname check) to
every library: both Kafka clients accept `ssl_context`, and Faust's credentials hold one,
so the TLS policy (chain always verified, TLS >= 1.2) cannot differ between them.
"""
from __future__ import annotations

import ssl
from typing import TYPE_CHECKING, Any

from stream_app.config import Settings
from stream_app.errors import UserError

if TYPE_CHECKING:
    from faust.types.auth import CredentialsT


def uses_tls(settings: Settings) -> bool:
    return settings.security_protocol in ("SSL", "SASL_SSL")


def uses_sasl(settings: Settings) -> bool:
    return settings.security_protocol in ("SASL_PLAINTEXT", "SASL_SSL")


def _no_passphrase() -> bytes:
    # Without a callback OpenSSL would prompt on the terminal for an encrypted key and hang a worker
    raise UserError("ssl_keyfile is encrypted; store the key unencrypted (readable only by the worker's user)")


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The client TLS context, or None when the protocol has no TLS.

    The certificate chain is always verified (against ssl_cafile, else the system CAs);
    only the hostname check can be turned off, for brokers reached by an address their
    certificate does not name. Unreadable PEM files are one-line UserErrors naming the setting."""
    if not uses_tls(settings):
        return None
    name = "ssl_cafile"
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                         cafile=str(settings.ssl_cafile) if settings.ssl_cafile else None)
        ctx.minimum_version = max(ctx.minimum_version, ssl.TLSVersion.TLSv1_2)
        ctx.check_hostname = settings.ssl_check_hostname
        if settings.ssl_certfile:
            name = "ssl_certfile" if settings.ssl_keyfile is None else "ssl_certfile/ssl_keyfile"
            ctx.load_cert_chain(str(settings.ssl_certfile),
                                str(settings.ssl_keyfile) if settings.ssl_keyfile else None,
                                password=_no_passphrase)
    except ssl.SSLError as exc:
        env = " and ".join(f"STREAMREC_{n.upper()}" for n in name.split("/"))
        raise UserError(f"{name} is not usable PEM ({exc.reason or exc}); fix {env}") from None
    return ctx


def _client_options(settings: Settings) -> dict[str, Any]:
    if settings.security_protocol == "PLAINTEXT":
        return {}
    options: dict[str, Any] = {"security_protocol": settings.security_protocol}
    if uses_tls(settings):
        options["ssl_context"] = ssl_context(settings)
    if uses_sasl(settings):
        options.update(sasl_mechanism=settings.sasl_mechanism, sasl_plain_username=settings.sasl_username,
                       sasl_plain_password=settings.sasl_password.get_secret_value())
    return options


def kafka_python_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for KafkaAdminClient, KafkaProducer and KafkaConsumer ({} for PLAINTEXT).

    kafka-python uses sasl_plain_username/password for SCRAM as well as PLAIN."""
    return _client_options(settings)


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaConsumer/Producer ({} for PLAINTEXT).

    aiokafka happens to use kafka-python's argument names; a separate function keeps call
    sites honest about which library they feed, should the two ever differ."""
    return _client_options(settings)


def faust_credentials(settings: Settings) -> "CredentialsT | None":
    """Faust's `broker_credentials`, or None for PLAINTEXT.

    Faust turns them into aiokafka arguments for its consumer, producer and topic-creating
    client (faust.transport.drivers.aiokafka.credentials_to_aiokafka_auth): SSLCredentials
    -> SSL, SASLCredentials -> SASL_PLAINTEXT, or SASL_SSL when given an ssl_context."""
    import faust

    if settings.security_protocol == "PLAINTEXT":
        return None
    if settings.security_protocol == "SSL":
        return faust.SSLCredentials(ssl_context(settings))
    return faust.SASLCredentials(username=settings.sasl_username,
                                 password=settings.sasl_password.get_secret_value(),
                                 mechanism=settings.sasl_mechanism, ssl_context=ssl_context(settings))
