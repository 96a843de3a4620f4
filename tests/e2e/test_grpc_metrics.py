"""The conventional gRPC server metrics (go-grpc-prometheus' names) count every call on the port, whatever
its service and however it ended: refused for its token, unparsable, bad input, health, reflection,
streams message by message."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.launcher import ServerProcess, scrape

TOKEN = "grpc-metrics-token"
INFERENCE = "cbam.v1.InferenceService"


def test_every_call_on_the_port_is_counted_by_service_method_type_and_code(samples) -> None:
    good = [("authorization", f"Bearer {TOKEN}")]
    with (
        ServerProcess("--auth.tokens", TOKEN) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        for image, _ in samples[:3]:
            stub.Classify(pb.ClassifyRequest(encoded=image), timeout=30, metadata=good)
        for _ in range(2):  # no token: refused before the message is parsed
            try:
                stub.Classify(pb.ClassifyRequest(encoded=samples[0][0]), timeout=30)
            except grpc.RpcError as error:
                assert error.code() == grpc.StatusCode.UNAUTHENTICATED
        raw = channel.unary_unary(f"/{INFERENCE}/Classify")  # bytes that are no ClassifyRequest
        try:
            raw(b"\xff\xff\xff", timeout=30, metadata=good)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        try:
            stub.Classify(pb.ClassifyRequest(encoded=b"not an image"), timeout=30, metadata=good)
        except grpc.RpcError as error:
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        items = [pb.ClassifyRequest(encoded=image) for image, _ in samples[:3]]
        assert len(list(stub.ClassifyStream(iter(items), timeout=30, metadata=good))) == 3
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(2):
            health.Check(health_pb2.HealthCheckRequest(), timeout=30)
        reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
        listed = list(
            reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        )
        assert INFERENCE in {s.name for s in listed[0].list_services_response.service}
        m = scrape(server.metrics_url)

    def key(name: str, service: str, method: str, kind: str, **labels: str) -> tuple[str, frozenset]:
        labels = {"grpc_service": service, "grpc_method": method, "grpc_type": kind, **labels}
        return name, frozenset(labels.items())

    def value(name: str, *method: str, **labels: str) -> float:
        return m.get(key(name, *method, **labels), 0.0)

    classify = (INFERENCE, "Classify", "unary")
    assert value("grpc_server_started_total", *classify) == 3 + 2 + 1 + 1
    assert value("grpc_server_handled_total", *classify, grpc_code="OK") == 3
    assert value("grpc_server_handled_total", *classify, grpc_code="Unauthenticated") == 2
    assert value("grpc_server_handled_total", *classify, grpc_code="InvalidArgument") == 2
    assert value("grpc_server_handling_seconds_count", *classify) == 7
    assert value("grpc_server_handling_seconds_bucket", *classify, le="+Inf") == 7
    assert value("grpc_server_msg_received_total", *classify) == 7
    assert value("grpc_server_msg_sent_total", *classify) == 3  # only answers that are messages

    stream = (INFERENCE, "ClassifyStream", "bidi_stream")
    assert value("grpc_server_started_total", *stream) == 1
    assert value("grpc_server_handled_total", *stream, grpc_code="OK") == 1
    assert value("grpc_server_msg_received_total", *stream) == 3
    assert value("grpc_server_msg_sent_total", *stream) == 3

    check = ("grpc.health.v1.Health", "Check", "unary")
    assert value("grpc_server_handled_total", *check, grpc_code="OK") == 2
    assert value("grpc_server_msg_sent_total", *check) == 2
    info = ("grpc.reflection.v1alpha.ServerReflection", "ServerReflectionInfo", "bidi_stream")
    assert value("grpc_server_handled_total", *info, grpc_code="OK") == 1
    assert value("grpc_server_msg_received_total", *info) == 1
    assert value("grpc_server_msg_sent_total", *info) == 1
    # Methods not called yet exist from the start, at zero, so rate() shows 0 rather than nothing.
    batch = (INFERENCE, "ClassifyBatch", "unary")
    assert m[key("grpc_server_started_total", *batch)] == 0
    # The service's own counts agree with the conventional ones.
    assert (
        m[("cbam_requests_total", frozenset({"method": "Classify", "code": "UNAUTHENTICATED"}.items()))] == 2
    )
