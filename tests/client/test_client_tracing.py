"""The client sends the caller's trace context (W3C traceparent) with every call while an OpenTelemetry span
is active, nothing more when none is, and works the same without OpenTelemetry installed. Against the
scripted server of tests/client/conftest.py, which records what metadata each call brought;
tests/e2e/test_tracing.py checks the real server continues the trace."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from opentelemetry.sdk.trace import TracerProvider

from client import AsyncClient, Client
from server.launcher import child_env
from tests.support import ROOT

TRACER = TracerProvider().get_tracer("client-test")


def _traceparent(span) -> str:
    context = span.get_span_context()
    return f"00-{context.trace_id:032x}-{context.span_id:016x}-{context.trace_flags:02x}"


def test_the_blocking_client_sends_the_current_trace_context(scripted):
    servicer, address = scripted
    with Client(address, token="secret") as client:
        client.classify(b"image")
        with TRACER.start_as_current_span("caller") as span:
            client.classify(b"image")
            list(client.classify_stream([b"image"]))
    untraced, unary, stream = servicer.metadata
    assert "traceparent" not in untraced and untraced["authorization"] == "Bearer secret"
    assert unary["traceparent"] == stream["traceparent"] == _traceparent(span)
    assert unary["authorization"] == "Bearer secret"


def test_the_async_client_sends_the_current_trace_context(scripted):
    servicer, address = scripted

    async def calls():
        async with AsyncClient(address) as client:
            await client.classify(b"image")
            with TRACER.start_as_current_span("caller") as span:
                await client.classify(b"image")
                async for _ in client.classify_stream([b"image"]):
                    pass
            return span

    span = asyncio.run(calls())
    untraced, unary, stream = servicer.metadata
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
