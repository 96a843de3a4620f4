"""Traces, end to end: a real cbam-serve with tracing on exports OTLP over gRPC to a real receiver on
loopback (loadtest/otlp_sink.py), and the spans it sends continue the client's trace."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.trace import TracerProvider

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from client import AsyncClient, Client, InvalidArgumentError
from server.launcher import ServerProcess
from tests.support import wait_for

SERVER = trace_pb2.Span.SPAN_KIND_SERVER
BATCH = 4  # calls sent at once, batched together (max_batch_size 4, a long max_batch_delay_ms)
# A short export delay, so the spans of a call reach the receiver soon after it (waited for, never slept).
EXPORT_ENV = {"OTEL_BSP_SCHEDULE_DELAY": "50"}


@pytest.fixture(scope="module")
def server(otlp_sink) -> Iterator[ServerProcess]:
    args = (
        "--tracing.enabled", "true", "--tracing.endpoint", otlp_sink.endpoint,
        "--tracing.service_name", "cbam-serve-under-test",
        "--batching.max_batch_size", str(BATCH), "--batching.max_batch_delay_ms", "5000",
        "--log.level", "DEBUG",
    )  # fmt: skip
    with ServerProcess(*args, env=EXPORT_ENV) as process:
        yield process


@pytest.fixture(scope="module")
def tracer():
    """The caller's tracer: real spans with real ids, exported nowhere (the client only propagates)."""
    return TracerProvider().get_tracer("test-caller")


def _hex(raw: bytes) -> str:
    return raw.hex()


def _attributes(span: trace_pb2.Span) -> dict[str, object]:
    values = {}
    for kv in span.attributes:
        which = kv.value.WhichOneof("value")
        values[kv.key] = getattr(kv.value, which)
    return values


def _of_trace(trace_id: int, spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
    return [s for s in spans if s.trace_id == trace_id.to_bytes(16, "big")]


def _children(parent: trace_pb2.Span, spans: list[trace_pb2.Span]) -> dict[str, trace_pb2.Span]:
    return {s.name: s for s in spans if s.parent_span_id == parent.span_id}


def _linked_to(span: trace_pb2.Span) -> set[tuple[bytes, bytes]]:
    return {(link.trace_id, link.span_id) for link in span.links}


def test_a_classify_call_continues_the_callers_trace(server, otlp_sink, tracer, samples):
    with Client(server.address) as client, tracer.start_as_current_span("caller") as caller:
        # A batch of one closes only after max_batch_delay_ms, so send a full batch at once.
        asyncio.run(_classify_at_once(server.address, [samples[0][0]] * BATCH, attention="spatial"))
        client.model_info()
    context = caller.get_span_context()
    spans = otlp_sink.wait_for(
        lambda spans: len([s for s in _of_trace(context.trace_id, spans) if s.kind == SERVER]) == BATCH + 1,
        timeout_s=60,
    )
    ours = _of_trace(context.trace_id, spans)
    classify = [s for s in ours if s.name == "cbam.v1.InferenceService/Classify"]
    assert len(classify) == BATCH
    for span in classify:
        assert span.kind == SERVER
        assert span.parent_span_id == context.span_id.to_bytes(8, "big")  # the caller's span
        attributes = _attributes(span)
        assert attributes["rpc.system"] == "grpc"
        assert attributes["rpc.service"] == "cbam.v1.InferenceService"
        assert attributes["rpc.method"] == "Classify"
        assert attributes["rpc.grpc.status_code"] == 0
        assert attributes["cbam.model.arch"] and attributes["cbam.model.version"]
        assert attributes["cbam.attention"] == "SPATIAL"
        assert attributes["cbam.batch.size"] == BATCH
        assert len(attributes["cbam.request_id"]) == 32
        assert span.status.code != trace_pb2.Status.STATUS_CODE_ERROR
        stages = _children(span, ours)
        assert {"preprocess", "queue wait", "postprocess"} <= set(stages), sorted(stages)
        # The stages lie inside the call, in order.
        pre, wait, post = stages["preprocess"], stages["queue wait"], stages["postprocess"]
        assert span.start_time_unix_nano <= pre.start_time_unix_nano <= pre.end_time_unix_nano
        assert pre.end_time_unix_nano <= wait.start_time_unix_nano + 1_000_000  # queued right after
        assert wait.end_time_unix_nano <= post.start_time_unix_nano <= post.end_time_unix_nano
        assert post.end_time_unix_nano <= span.end_time_unix_nano
    # One forward for the four calls: a child of one of them, linked to each, and each one's queue
    # wait is linked back to it.
    (forward,) = [s for s in ours if s.name == "batch forward"]
    assert _attributes(forward)["cbam.batch.size"] == BATCH
    assert forward.parent_span_id in {s.span_id for s in classify}
    assert _linked_to(forward) == {(s.trace_id, s.span_id) for s in classify}
    for span in classify:
        wait = _children(span, ours)["queue wait"]
        assert _linked_to(wait) == {(forward.trace_id, forward.span_id)}
        assert wait.end_time_unix_nano == forward.start_time_unix_nano
    (info,) = [s for s in ours if s.name == "cbam.v1.InferenceService/GetModelInfo"]
    assert _attributes(info)["cbam.images"] == 0
    assert "cbam-serve-under-test" in otlp_sink.service_names


async def _classify_at_once(address: str, images: list[bytes], **options) -> None:
    async with AsyncClient(address) as client:
        await asyncio.gather(*(client.classify(image, **options) for image in images))


def test_failures_and_other_services_are_traced_with_their_status(server, otlp_sink, tracer, samples):
    with tracer.start_as_current_span("caller") as caller, Client(server.address) as client:
        with pytest.raises(InvalidArgumentError):
            client.classify(b"not an image")
        with grpc.insecure_channel(server.address) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            # No client SDK here: the context goes as metadata by hand, as any OpenTelemetry client does.
            context = caller.get_span_context()
            traceparent = f"00-{context.trace_id:032x}-{context.span_id:016x}-01"
            health.Check(health_pb2.HealthCheckRequest(), timeout=30, metadata=[("traceparent", traceparent)])
    trace_id = caller.get_span_context().trace_id
    spans = otlp_sink.wait_for(lambda spans: len(_of_trace(trace_id, spans)) >= 3, timeout_s=60)
    spans = _of_trace(trace_id, spans)
    by_name = {s.name: s for s in spans if s.kind == SERVER}
    refused = by_name["cbam.v1.InferenceService/Classify"]
    assert _attributes(refused)["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    # The caller's mistake, answered correctly: not an error of the server (OpenTelemetry's gRPC rules).
    assert refused.status.code != trace_pb2.Status.STATUS_CODE_ERROR
    assert "preprocess" in _children(refused, spans)
    check = by_name["grpc.health.v1.Health/Check"]
    assert _attributes(check)["rpc.grpc.status_code"] == 0


def test_stream_items_get_spans_of_their_own(server, otlp_sink, tracer, samples):
    with tracer.start_as_current_span("caller") as caller, Client(server.address) as client:
        results = list(client.classify_stream([image for image, _ in samples[:BATCH]]))
    assert all(result.error is None for result in results)
    trace_id = caller.get_span_context().trace_id
    spans = otlp_sink.wait_for(
        lambda spans: (
            len([s for s in _of_trace(trace_id, spans) if s.name == "ClassifyStream item"]) == BATCH
            and any(s.kind == SERVER for s in _of_trace(trace_id, spans))
        ),
        timeout_s=60,
    )
    ours = _of_trace(trace_id, spans)
    (call,) = [s for s in ours if s.kind == SERVER]
    assert call.name == "cbam.v1.InferenceService/ClassifyStream"
    items = [s for s in ours if s.name == "ClassifyStream item"]
    assert {s.parent_span_id for s in items} == {call.span_id}
    assert {_attributes(s)["cbam.request_id"] for s in items} == {str(i) for i in range(BATCH)}
    for item in items:
        assert {"preprocess", "queue wait", "postprocess"} <= set(_children(item, ours))


def test_log_lines_about_a_request_carry_its_request_and_trace_ids(server, otlp_sink, tracer, samples):
    with (
        tracer.start_as_current_span("caller") as caller,
        Client(server.address) as client,
        pytest.raises(InvalidArgumentError),
    ):
        client.classify(b"not an image", request_id="log-me")
    trace_id = f"{caller.get_span_context().trace_id:032x}"
    (line,) = wait_for(
        lambda: [e for e in server.events_named("request") if e.get("request_id") == "log-me"],
        what="the request's log line",
    )
    assert line["trace_id"] == trace_id
    (span,) = [s for s in _of_trace(int(trace_id, 16), otlp_sink.wait_for(
        lambda spans: _of_trace(int(trace_id, 16), spans), timeout_s=60)) if s.kind == SERVER]  # fmt: skip
    assert line["span_id"] == _hex(span.span_id)
    assert line["code"] == "INVALID_ARGUMENT"


def test_untraced_callers_get_a_trace_of_their_own(server, otlp_sink, samples):
    with grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)

    def roots(spans: list[trace_pb2.Span]) -> list[trace_pb2.Span]:
        return [s for s in spans if s.name.endswith("/GetModelInfo") and not s.parent_span_id]

    found = roots(otlp_sink.wait_for(roots, timeout_s=60))
    assert found and all(len(s.trace_id) == 16 and any(s.trace_id) for s in found)


def test_the_traced_server_logged_no_error(server):
    # Last in this module: every call above, traced, and nothing went wrong on the server's side
    # (OpenTelemetry logs a context it could not detach, or an export that failed, as errors).
    assert [e for e in server.events if e.get("level") == "ERROR"] == []
    assert "Traceback" not in server.output
