"""One real cbam-serve (a subprocess on loopback) shared by the e2e tests that only read from it."""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from cbam.v1 import inference_pb2_grpc
from server.launcher import ServerProcess

# max_batch_size 16 with a 100 ms delay: 16 concurrent calls close a batch at once, fewer wait.
SHARED_ARGS = ("--batching.max_batch_size", "16", "--batching.max_batch_delay_ms", "100")


@pytest.fixture(scope="session")
def served() -> Iterator[ServerProcess]:
    with ServerProcess(*SHARED_ARGS) as server:
        yield server


@pytest.fixture
def stub(served: ServerProcess) -> Iterator[inference_pb2_grpc.InferenceServiceStub]:
    with grpc.insecure_channel(served.address) as channel:
        yield inference_pb2_grpc.InferenceServiceStub(channel)
