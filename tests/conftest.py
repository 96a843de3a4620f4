"""Fixtures shared by every test folder: a clean environment, the shared real server, in-process servers."""

from __future__ import annotations

import json
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
    # in a server it starts, nor may an OTEL_* one turn tracing on: removed once, for the whole session.
    for name in [name for name in os.environ if name.startswith(("CBAM_", "OTEL_"))]:
        del os.environ[name]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """Set environment variables for one test (no CBAM_* or OTEL_* variable from the outer shell is left)."""

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


@pytest.fixture(scope="session")
def samples() -> list[tuple[bytes, str]]:
    """The default model's sample digits: (PNG bytes, true label)."""
    from models import SAMPLES_DIR

    labels = json.loads((SAMPLES_DIR / "labels.json").read_text())
    return [((SAMPLES_DIR / name).read_bytes(), label) for name, label in sorted(labels.items())]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-cuda",
        action="store_true",
        help="fail, rather than skip, the tests marked cuda when no CUDA device is usable "
        "(scripts/gpu_check.sh runs them so)",
    )


@pytest.hookimpl(tryfirst=True)  # before fixtures start a GPU server for a test that cannot run
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is None:
        return
    import torch  # here, so that collecting the suite does not wait for torch

    if torch.cuda.is_available():
        return
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    why = f"no CUDA device usable: torch {torch.__version__} ({build}) sees {torch.cuda.device_count()} GPUs"
    if item.config.getoption("--require-cuda"):
        pytest.fail(f"--require-cuda, but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def otlp_sink():
    """A real OTLP trace receiver on loopback (loadtest/otlp_sink.py) for one test module's servers."""
    from loadtest.otlp_sink import OtlpSink  # needs the tracing extra

    with OtlpSink() as sink:
        yield sink
