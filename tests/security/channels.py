"""TLS channels and probes for the security tests."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from tests.security.certs import Pki


def tls_args(pki: Pki) -> list[str]:
    return ["--tls.cert_file", str(pki.server_cert), "--tls.key_file", str(pki.server_key)]


def secure_channel(
    port: int, pki: Pki, *, root: str = "ca_cert", client: str | None = None
) -> grpc.aio.Channel:
    """A TLS channel to 127.0.0.1:port trusting ``root``, presenting the ``client`` certificate if given."""
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.read(root),
        private_key=pki.read(f"{client}_key") if client else None,
        certificate_chain=pki.read(f"{client}_cert") if client else None,
    )
    return grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials)


async def model_info(channel: grpc.aio.Channel, metadata=None) -> pb.ModelInfo:
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    return await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)


async def health(channel: grpc.aio.Channel) -> int:
    reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status
