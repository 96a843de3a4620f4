"""Where and how to connect: gRPC targets for one or several servers, channel options, TLS, tokens."""

from __future__ import annotations

import ipaddress
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc

__all__ = ["ChannelSettings", "TlsConfig", "build_target"]

DEFAULT_TARGET = "localhost:50051"
# round_robin spreads calls over every address the resolver gives: the list we pass, or every address
# of a dns:/// name. gRPC's default, pick_first, would send everything to one of them.
_ROUND_ROBIN = json.dumps({"loadBalancingConfig": [{"round_robin": {}}]})
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")


@dataclass(frozen=True)
class TlsConfig:
    """TLS for the channel: PEM bytes of the root CA (None: the system's roots), and for mutual TLS the
    client's certificate chain and private key. `server_name` overrides the name checked in the server's
    certificate (for a certificate issued to a name other than the one dialled)."""

    root_certificates: bytes | None = None
    certificate_chain: bytes | None = None
    private_key: bytes | None = None
    server_name: str | None = None

    def __post_init__(self) -> None:
        if (self.certificate_chain is None) != (self.private_key is None):
            raise ValueError("mutual TLS needs both certificate_chain and private_key, got only one")

    @classmethod
    def from_files(
        cls,
        ca: str | os.PathLike | None = None,
        cert: str | os.PathLike | None = None,
        key: str | os.PathLike | None = None,
        server_name: str | None = None,
    ) -> TlsConfig:
        """Read the PEM files; any of them may be left out."""

        def read(path: str | os.PathLike | None) -> bytes | None:
            return None if path is None else Path(path).read_bytes()

        return cls(read(ca), read(cert), read(key), server_name)

    def credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.root_certificates, self.private_key, self.certificate_chain)


@dataclass(frozen=True)
class ChannelSettings:
    """How to build a channel. Sizes in bytes, times in seconds; keepalive None sends no pings."""

    tls: TlsConfig | None = None
    max_message_bytes: int = 64 * 1024 * 1024
    keepalive_seconds: float | None = None
    keepalive_timeout_seconds: float = 20.0
    extra_options: tuple[tuple[str, object], ...] = ()

    def __post_init__(self) -> None:
        if self.max_message_bytes < 1:
            raise ValueError(f"max_message_bytes should be >= 1, got {self.max_message_bytes}")
        if self.keepalive_seconds is not None and self.keepalive_seconds <= 0:
            raise ValueError(f"keepalive_seconds should be > 0 or None, got {self.keepalive_seconds}")

    def options(self) -> list[tuple[str, object]]:
        options: list[tuple[str, object]] = [
            ("grpc.service_config", _ROUND_ROBIN),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.max_receive_message_length", self.max_message_bytes),
        ]
        if self.keepalive_seconds is not None:
            options += [
                ("grpc.keepalive_time_ms", int(self.keepalive_seconds * 1000)),
                ("grpc.keepalive_timeout_ms", int(self.keepalive_timeout_seconds * 1000)),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.max_pings_without_data", 0),
            ]
        if self.tls is not None and self.tls.server_name:
            options.append(("grpc.ssl_target_name_override", self.tls.server_name))
        return options + list(self.extra_options)


def build_target(target: str | Sequence[str]) -> str:
    """A gRPC target string for one address, a gRPC URI, or a list of addresses to balance over.

    "host:port" and URIs ("dns:///name:port", "ipv4:...", "unix:...") pass through unchanged. Several
    addresses ("127.0.0.1:5001,127.0.0.1:5002" or a list) must be IP literals of one family and become
    "ipv4:127.0.0.1:5001,127.0.0.1:5002" (or "ipv6:[::1]:5001,[::1]:5002"); for host names give one
    "dns:///name:port" and let DNS list the addresses.
    """
    if isinstance(target, str) and target.startswith(_SCHEMES):
        return target
    addresses = [a.strip() for a in target.split(",")] if isinstance(target, str) else list(target)
    addresses = [a for a in addresses if a]
    if not addresses:
        raise ValueError(f"target should name at least one address, got {target!r}")
    if len(addresses) == 1:
        return addresses[0]
    families = {_ip_family(address) for address in addresses}
    if len(families) != 1 or None in families:
        raise ValueError(
            f"several addresses should all be IPv4 or all IPv6 literals with ports, got {addresses}; "
            "for host names use one dns:///name:port target"
        )
    family = families.pop()
    return f"{family}:" + ",".join(addresses)


def _ip_family(address: str) -> str | None:
    if address.startswith(_SCHEMES):
        return None
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit():
        return None
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return f"ipv{ipaddress.ip_address(host).version}"
    except ValueError:
        return None
