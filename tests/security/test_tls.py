"""TLS and mutual TLS on the gRPC port, from the certificate files in the `tls` settings group.

The certificates come from a throw-away CA (certs.py). Every refused connection is refused at the
handshake, which a client sees as UNAVAILABLE.
"""

from __future__ import annotations

import logging

import grpc
import pytest
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from server.app import build_server, plaintext_warning
from server.config import load_settings
from server.errors import StartupError
from tests.security.channels import health, model_info, secure_channel, tls_args

SERVING = health_pb2.HealthCheckResponse.SERVING
UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


async def _refused(channel: grpc.aio.Channel) -> None:
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await model_info(channel)
    assert raised.value.code() is UNAVAILABLE


async def test_without_tls_settings_the_port_is_plaintext(make_server):
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        assert (await model_info(channel)).labels
        assert await health(channel) == SERVING


async def test_with_a_certificate_the_port_speaks_only_tls(make_server, pki):
    server = await make_server(*tls_args(pki))
    async with secure_channel(server.port, pki) as channel:
        assert (await model_info(channel)).labels
        assert await health(channel) == SERVING
    await _refused(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))
    # a client that does not trust the server's CA hangs up
    await _refused(secure_channel(server.port, pki, root="rogue_cert"))


async def test_mutual_tls_requires_a_client_certificate_signed_by_the_client_ca(make_server, pki):
    server = await make_server(
        *tls_args(pki), "--tls.client_ca_file", str(pki.ca_cert), "--tls.require_client_auth", "true"
    )
    async with secure_channel(server.port, pki, client="client") as channel:
        assert (await model_info(channel)).labels
        assert await health(channel) == SERVING
    await _refused(secure_channel(server.port, pki))  # no client certificate
    await _refused(secure_channel(server.port, pki, client="rogue"))  # signed by another CA
    await _refused(secure_channel(server.port, pki, client="expired"))
    await _refused(grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"))


async def test_a_client_ca_alone_means_client_certificates_are_required(make_server, pki):
    """require_client_auth unset means true with a client CA: naming one never silently lets anyone in."""
    server = await make_server(*tls_args(pki), "--tls.client_ca_file", str(pki.ca_cert))
    await _refused(secure_channel(server.port, pki))
    async with secure_channel(server.port, pki, client="client") as channel:
        assert (await model_info(channel)).labels


def test_optional_client_certificates_are_refused_as_a_setting(pki):
    """grpcio either requires and verifies client certificates or never asks for them; a client CA
    with require_client_auth false would verify nothing, so it is refused rather than ignored."""
    argv = [*tls_args(pki), "--tls.client_ca_file", str(pki.ca_cert), "--tls.require_client_auth", "false"]
    with pytest.raises(ValidationError, match="require_client_auth"):
        load_settings(argv)


# -- settings that cannot work are refused at start-up, naming the field --------------------------------


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--tls.cert_file", "{server_cert}"], "tls"),
        (["--tls.key_file", "{server_key}"], "tls"),
        (["--tls.client_ca_file", "{ca_cert}"], "tls"),
        (["--tls.require_client_auth", "true"], "tls"),
        (["--tls.cert_file", "/nonexistent.pem", "--tls.key_file", "{server_key}"], "tls.cert_file"),
    ],
)
def test_incomplete_tls_settings_are_invalid(pki, argv, field):
    paths = {name: str(getattr(pki, name)) for name in ("server_cert", "server_key", "ca_cert")}
    with pytest.raises(ValidationError) as raised:
        load_settings([arg.format(**paths) for arg in argv])
    assert any(".".join(map(str, e["loc"])).startswith(field) for e in raised.value.errors())


@pytest.mark.parametrize(
    "cert, key, ca, field",
    [
        ("server_cert", "client_key", None, "tls.key_file"),  # a key that is not the certificate's
        ("garbage", "server_key", None, "tls.cert_file"),
        ("server_cert", "garbage", None, "tls.key_file"),
        ("server_cert", "server_key", "garbage", "tls.client_ca_file"),
    ],
)
async def test_unusable_certificate_files_stop_the_server_at_start_up(pki, tmp_path, cert, key, ca, field):
    """Not at the first handshake, while health says SERVING: at start-up, naming the file."""
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")

    def path(name):
        return str(garbage) if name == "garbage" else str(getattr(pki, name))

    argv = ["--host", "127.0.0.1", "--port", "0", "--metrics.enabled", "false",
            "--tls.cert_file", path(cert), "--tls.key_file", path(key)]  # fmt: skip
    if ca:
        argv += ["--tls.client_ca_file", path(ca)]
    with pytest.raises(StartupError) as raised:
        build_server(load_settings(argv))
    assert raised.value.field == field


# -- plaintext beyond loopback is allowed, and logged as a warning --------------------------------------


@pytest.mark.parametrize("host", ["[::]", "0.0.0.0", "192.0.2.10", "cbam.example.com", "[2001:db8::1]"])
def test_plaintext_on_a_host_beyond_loopback_is_warned_about(host):
    message = plaintext_warning(load_settings(["--host", host]))
    assert message is not None and "plaintext" in message and host in message


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.53", "[::1]", "::1", "localhost"])
def test_plaintext_on_loopback_is_not_warned_about(host):
    assert plaintext_warning(load_settings(["--host", host])) is None


def test_tls_is_never_warned_about(pki):
    assert plaintext_warning(load_settings(["--host", "[::]", *tls_args(pki)])) is None


async def test_the_server_logs_the_warning_when_it_binds(make_server, caplog):
    with caplog.at_level(logging.WARNING, logger="server.app"):
        await make_server()
    assert not [r for r in caplog.records if "plaintext" in r.getMessage()]
    # Bound on every interface but never started: no call is made to or from anything but loopback.
    with caplog.at_level(logging.WARNING, logger="server.app"):
        argv = ["--host", "0.0.0.0", "--port", "0", "--metrics.enabled", "false"]
        server, _ = build_server(load_settings(argv))
    await server.stop(0)
    assert [r for r in caplog.records if "plaintext" in r.getMessage() and r.levelno == logging.WARNING]
