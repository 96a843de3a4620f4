"""The client sends the caller's trace context (W3C traceparent) with every call while an OpenTelemetry span
is active, nothing more when none is, and works the same without OpenTelemetry installed. Against a
scripted server on loopback that records what metadata each call brought; tests/e2e/test_tracing.py
checks the real server continues the trace."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from concurrent import futures

import grpc
import pytest
from opentelemetry.sdk.trace import TracerProvider

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from client import AsyncClient, Client
from server.launcher import child_env
from tests.support import ROOT

TRACER = TracerProvider().get_tracer("client-test")


class Recording(inference_pb2_grpc.InferenceServiceServicer):
    """Answers label "seven" for every image, and keeps the metadata each call brought."""

    def __init__(self) -> None:
        self.metadata: list[dict[str, str]] = []

    @staticmethod
    def _answer(request: pb.ClassifyRequest) -> pb.ClassifyResponse:
        label = pb.Label(index=7, name="seven", probability=1.0)
        return pb.ClassifyResponse(
            request_id=request.request_id, labels=[label], timings=pb.Timings(batch_size=1)
        )

    def Classify(self, request, context):  # noqa: N802 (the proto's name)
        self.metadata.append(dict(context.invocation_metadata()))
        return self._answer(request)

    def ClassifyStream(self, request_iterator, context):  # noqa: N802
        self.metadata.append(dict(context.invocation_metadata()))
        for request in request_iterator:
            yield pb.ClassifyStreamResponse(request_id=request.request_id, response=self._answer(request))


@pytest.fixture
def recorded():
    """(the metadata of every call the recording server answered, its address)."""
    servicer = Recording()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer.metadata, f"127.0.0.1:{port}"
    server.stop(grace=None)


def _traceparent(span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_the_blocking_client_sends_the_current_trace_context(recorded):
    seen, address = recorded
    with Client(address, token="secret") as client:
        client.classify(b"image")
        with TRACER.start_as_current_span("caller") as span:
            client.classify(b"image")
            list(client.classify_stream([b"image"]))
    untraced, unary, stream = seen
    assert "traceparent" not in untraced and untraced["authorization"] == "Bearer secret"
    assert unary["traceparent"] == stream["traceparent"] == _traceparent(span)
    assert unary["authorization"] == "Bearer secret"


def test_the_async_client_sends_the_current_trace_context(recorded):
    seen, address = recorded

    async def calls():
        async with AsyncClient(address) as client:
            await client.classify(b"image")
            with TRACER.start_as_current_span("caller") as span:
                await client.classify(b"image")
                async for _ in client.classify_stream([b"image"]):
                    pass
            return span

    span = asyncio.run(calls())
    untraced, unary, stream = seen
    assert "traceparent" not in untraced
    assert unary["traceparent"] == stream["traceparent"] == _traceparent(span)


def test_the_client_works_without_opentelemetry(scripted):
    _, address = scripted
    script = (
        "import sys; sys.modules['opentelemetry'] = None\n"
        "from client import Client\n"
        f"with Client({address!r}) as client: print(client.classify(b'image').labels[0].name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "seven"
