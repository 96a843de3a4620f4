"""A throw-away PKI for TLS tests, made with `cryptography`: a CA, a server and a client certificate.

    pki = make_pki(tmp_path)
    pki.server_cert, pki.server_key     # for the server; SANs: localhost, 127.0.0.1, ::1
    pki.ca_cert                         # the root a client trusts, and the server checks clients against
    pki.client_cert, pki.client_key     # a client certificate signed by that CA
    pki.rogue_cert, pki.rogue_key       # a client certificate signed by a different CA
    pki.expired_cert, pki.expired_key   # signed by the right CA, but no longer valid

Keys are P-256 ECDSA: fast to make and accepted by gRPC's BoringSSL.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SERVER_NAMES = ("localhost", "127.0.0.1", "::1")
_SERVER_AUTH, _CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path
    rogue_key: Path
    expired_cert: Path
    expired_key: Path

    def read(self, name: str) -> bytes:
        """The PEM bytes of one of the files, e.g. `pki.read("ca_cert")`."""
        return getattr(self, name).read_bytes()


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _ca(common_name: str) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _leaf(
    common_name: str,
    issuer: tuple[x509.Certificate, ec.EllipticCurvePrivateKey],
    *,
    server: bool,
    expired: bool = False,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    ca_cert, ca_key = issuer
    key = _key()
    now = dt.datetime.now(dt.timezone.utc)
    not_before, not_after = now - dt.timedelta(minutes=5), now + dt.timedelta(days=1)
    if expired:
        not_before, not_after = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([_SERVER_AUTH if server else _CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
    )
    if server:
        names: list[x509.GeneralName] = []
        for name in SERVER_NAMES:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                names.append(x509.DNSName(name))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(ca_key, hashes.SHA256()), key


def _write(directory: Path, stem: str, cert: x509.Certificate, key=None) -> tuple[Path, Path | None]:
    cert_path = directory / f"{stem}.crt"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    if key is None:
        return cert_path, None
    key_path = directory / f"{stem}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


def make_pki(directory: Path) -> Pki:
    """Make a CA, server, client, rogue-client and expired-client certificate under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    ca = _ca("cbam-serve test CA")
    rogue_ca = _ca("someone else's CA")
    ca_cert, _ = _write(directory, "ca", ca[0])
    server_cert, server_key = _write(directory, "server", *_leaf("localhost", ca, server=True))
    client_cert, client_key = _write(directory, "client", *_leaf("test-client", ca, server=False))
    rogue_cert, rogue_key = _write(directory, "rogue", *_leaf("rogue-client", rogue_ca, server=False))
    expired_cert, expired_key = _write(
        directory, "expired", *_leaf("expired-client", ca, server=False, expired=True)
    )
    return Pki(
        ca_cert=ca_cert,
        server_cert=server_cert,
        server_key=server_key,
        client_cert=client_cert,
        client_key=client_key,
        rogue_cert=rogue_cert,
        rogue_key=rogue_key,
        expired_cert=expired_cert,
        expired_key=expired_key,
    )
