"""TLS (server-authenticated and mutual) and bearer tokens, against a real cbam-serve that asks for them."""

import grpc
import pytest
from real_server import FIRST_SAMPLE

from client import AuthenticationError, Client, TlsConfig, UnavailableError
from client.cli import main
from server.launcher import ServerProcess
from tests.security.certs import make_pki

pytestmark = pytest.mark.slow  # a server of its own, with TLS

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A server with mutual TLS and a bearer token; (server, pki)."""
    pki = make_pki(tmp_path_factory.mktemp("pki"))
    args = ["--tls.cert_file", str(pki.server_cert), "--tls.key_file", str(pki.server_key),
            "--tls.client_ca_file", str(pki.ca_cert)]  # fmt: skip
    with ServerProcess(*args, env={"CBAM_AUTH__TOKENS": f'["{TOKEN}"]'}) as server:
        yield server, pki


def _tls(pki, **kwargs) -> TlsConfig:
    return TlsConfig.from_files(pki.ca_cert, pki.client_cert, pki.client_key, **kwargs)


def test_mutual_tls_and_token_classify(secured):
    server, pki = secured
    with Client(server.address, tls=_tls(pki), token=TOKEN) as client:
        assert client.classify(FIRST_SAMPLE).top.name
        assert client.health() == "SERVING"


def test_missing_or_wrong_token_is_an_authentication_error(secured):
    server, pki = secured
    for token in (None, "wrong"):
        with (
            Client(server.address, tls=_tls(pki), token=token) as client,
            pytest.raises(AuthenticationError) as e,
        ):
            client.classify(FIRST_SAMPLE)
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED


def test_plaintext_or_no_client_certificate_never_gets_through(secured):
    server, pki = secured
    for client in (
        Client(server.address, token=TOKEN, timeout=5),
        Client(server.address, tls=TlsConfig.from_files(pki.ca_cert), token=TOKEN, timeout=5),
    ):
        with client, pytest.raises(UnavailableError):
            client.model_info()


def test_cli_with_tls_flags_and_token_from_the_environment(secured, monkeypatch, capsys):
    server, pki = secured
    monkeypatch.setenv("CBAM_TOKEN", TOKEN)
    argv = ["--target", server.address, "--tls-ca", str(pki.ca_cert), "--tls-cert", str(pki.client_cert),
            "--tls-key", str(pki.client_key)]  # fmt: skip
    assert main(["classify", str(FIRST_SAMPLE), "--json", *argv]) == 0
    assert '"labels"' in capsys.readouterr().out
    monkeypatch.delenv("CBAM_TOKEN")
    assert main(["classify", str(FIRST_SAMPLE), "--json", *argv]) == 1
    assert "UNAUTHENTICATED" in capsys.readouterr().err
