"""The limits a caller cannot exceed are configurable and enforced; /metrics binds only where told."""

from __future__ import annotations

import socket
import urllib.request

import grpc
import pytest

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from tests.reliability.corpus import encode, picture, png_bomb


async def _classify(server, request: pb.ClassifyRequest) -> tuple[grpc.StatusCode, str]:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        try:
            await stub.Classify(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


async def test_the_message_size_limit_is_configurable_and_enforced(make_server):
    server = await make_server("--limits.max_message_bytes", "65536")
    fits = pb.ClassifyRequest(encoded=encode(picture(64, 64)))
    assert fits.ByteSize() < 65536
    assert (await _classify(server, fits))[0] is grpc.StatusCode.OK
    too_big = pb.ClassifyRequest(encoded=encode(picture(8, 8)) + bytes(70_000))
    code, message = await _classify(server, too_big)
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "65536" in message


async def test_the_pixel_limit_is_configurable_and_enforced(make_server):
    server = await make_server("--limits.max_image_pixels", "1000")
    fits = pb.ClassifyRequest(encoded=encode(picture(40, 25)))
    assert (await _classify(server, fits))[0] is grpc.StatusCode.OK
    code, message = await _classify(server, pb.ClassifyRequest(encoded=encode(picture(40, 26))))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED and "1000" in message
    # a bomb costs its header only
    code, _ = await _classify(server, pb.ClassifyRequest(encoded=png_bomb(20_000)))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED
    tensor = pb.Tensor(dtype=pb.Tensor.DTYPE_UINT8, shape=[40, 26, 3], data=bytes(40 * 26 * 3))
    code, _ = await _classify(server, pb.ClassifyRequest(tensor=tensor))
    assert code is grpc.StatusCode.RESOURCE_EXHAUSTED


def _connects(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(2)
        return s.connect_ex((host, port)) == 0


@pytest.mark.parametrize("bind, reachable, unreachable", [("127.0.0.1", "127.0.0.1", "::1"),
                                                         ("::1", "::1", "127.0.0.1")])  # fmt: skip
async def test_the_metrics_endpoint_binds_only_its_configured_address(
    make_server, bind, reachable, unreachable
):
    server = await make_server("--metrics.enabled", "true", "--metrics.host", bind, "--metrics.port", "0")
    port = server.metrics_port
    assert port
    url_host = f"[{reachable}]" if ":" in reachable else reachable
    with urllib.request.urlopen(f"http://{url_host}:{port}/metrics", timeout=5) as response:
        assert b"cbam_requests_total" in response.read()
    assert not _connects(unreachable, port)
