"""Fixtures shared by every test folder: a clean environment, the shared real server, in-process servers."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

import grpc
import pytest

from cbam.v1 import inference_pb2_grpc
from server.launcher import ServerProcess

if TYPE_CHECKING:
    from server.app import InferenceServer

MakeServer = Callable[..., Awaitable["InferenceServer"]]


def pytest_configure(config: pytest.Config) -> None:
    # A CBAM_* variable in the developer's shell must not change what a test sees, in this process or
    # in a server it starts: removed once, for the whole session.
    for name in [name for name in os.environ if name.startswith("CBAM_")]:
        del os.environ[name]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """Set environment variables for one test (no CBAM_* variable from the outer shell is left)."""

    class _Env:
        def set(self, name: str, value: str) -> None:
            monkeypatch.setenv(name, value)

    return _Env()


@pytest.fixture(scope="session")
def live() -> Iterator[ServerProcess]:
    """One real cbam-serve with default settings (the default model), started once and shared by every
    test that only calls it. Its counters keep growing across tests: read them as differences."""
    with ServerProcess() as server:
        yield server


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """Build (and by default start) in-process servers: default model, 127.0.0.1, port 0, no /metrics
    endpoint; every one is stopped when the test ends."""
    from server.app import build_server  # torch: only for the tests that serve in process
    from server.config import load_settings

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
    """A stub on a fresh channel to an in-process server; every channel is closed when the test ends."""
    channels: list[grpc.aio.Channel] = []

    def stub(server: InferenceServer) -> inference_pb2_grpc.InferenceServiceStub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return inference_pb2_grpc.InferenceServiceStub(channel)

    yield stub
    for channel in channels:
        await channel.close()
