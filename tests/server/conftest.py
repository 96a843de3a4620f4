from __future__ import annotations

import asyncio
import io
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc
import numpy as np
import pytest
from PIL import Image

from cbam.v1 import inference_pb2_grpc
from server.app import InferenceServer, build_server
from server.config import load_settings
from server.runner import ModelRunner


@pytest.fixture(autouse=True)
def _no_outer_cbam_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CBAM_* (or OTEL_*: it can turn tracing on) variable in the developer's shell must not change
    # what these tests see.
    for name in list(os.environ):
        if name.startswith(("CBAM_", "OTEL_")):
            monkeypatch.delenv(name)


def png(seed: int = 0, size: tuple[int, int] = (32, 32)) -> bytes:
    """A small RGB test picture, as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


MakeServer = Callable[..., Awaitable[InferenceServer]]


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """Build and start in-process servers (default model, loopback, no /metrics endpoint) on port 0."""
    servers: list[InferenceServer] = []

    async def make(*argv: str, start: bool = True) -> InferenceServer:
        base = ["--host", "127.0.0.1", "--port", "0", "--metrics.enabled", "false"]
        server, _ = build_server(load_settings([*base, *argv]))
        servers.append(server)
        if start:
            await server.start()
        return server

    yield make
    for server in servers:
        await server.stop(0)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[[InferenceServer], inference_pb2_grpc.InferenceServiceStub]]:
    channels: list[grpc.aio.Channel] = []

    def stub(server: InferenceServer) -> inference_pb2_grpc.InferenceServiceStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    yield stub
    for channel in channels:
        await channel.close()


class Gate:
    """Holds every forward pass (after ``close()``) until ``release()``; counts what was computed."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._entered = threading.Event()
        self.closed = False
        self.computed: list[int] = []  # batch sizes (images) computed while the gate was in use

    def close(self) -> None:
        self._open.clear()
        self._entered.clear()
        self.closed = True

    def release(self) -> None:
        self._open.set()

    async def wait_entered(self, timeout: float = 10.0) -> None:
        assert await asyncio.to_thread(self._entered.wait, timeout), "no forward pass started"

    def _pass(self, size: int) -> None:
        if self.closed:
            self.computed.append(size)
            self._entered.set()
            assert self._open.wait(30), "gate never released"


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch):
    g = Gate()
    original = ModelRunner.run_batch

    def gated(runner: ModelRunner, items):
        g._pass(sum(item.count for item in items))  # images: a chunk counts all of its own
        return original(runner, items)

    monkeypatch.setattr(ModelRunner, "run_batch", gated)
    yield g
    g.release()


def sample(server: InferenceServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition never became true"
        await asyncio.sleep(0.005)
