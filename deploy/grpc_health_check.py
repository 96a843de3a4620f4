"""Exit 0 when a cbam-serve answers SERVING on the gRPC health service, 1 otherwise.

The container health check (deploy/Dockerfile, docker-compose.yml): grpc_health_probe is not
installed in the image, and grpcio with grpc_health already is.

    python grpc_health_check.py                      # 127.0.0.1:$CBAM_PORT (default 50051)
    python grpc_health_check.py --address host:port --service ""
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def check(address: str, service: str, timeout_s: float) -> tuple[bool, str]:
    """Ask ``address`` for the health of ``service``; return (serving, what was seen)."""
    with grpc.insecure_channel(address) as channel:
        try:
            reply = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout_s
            )
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--address", default=f"127.0.0.1:{os.environ.get('CBAM_PORT', '50051')}")
    parser.add_argument("--service", default="cbam.v1.InferenceService", help='"" is the whole server')
    parser.add_argument("--timeout", type=float, default=2.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    serving, seen = check(args.address, args.service, args.timeout)
    print(f"{args.address} {args.service or '(server)'}: {seen}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
