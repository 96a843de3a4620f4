"""cbam-serve on a GPU over a real socket: float16 answers, attention maps from the device, and the CUDA
memory gauges on /metrics.

Marked cuda: skipped where no CUDA device is usable, failed there under --require-cuda.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from client import Client
from server.launcher import ServerProcess, scrape

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def gpu_server() -> Iterator[ServerProcess]:
    with ServerProcess("--model.device", "cuda", "--model.dtype", "float16", startup_timeout=180) as server:
        yield server


def test_float16_on_the_gpu_classifies_the_samples(gpu_server, samples) -> None:
    with Client(gpu_server.address, timeout=60) as client:
        info = client.model_info()
        predictions = [client.classify(image, top_k=1) for image, _ in samples]
    assert info.device.startswith("cuda") and info.dtype == "float16"
    right = sum(p.top.name == label for p, (_, label) in zip(predictions, samples, strict=True))
    assert right >= 0.9 * len(samples)


def test_attention_maps_come_back_from_the_gpu(gpu_server, samples) -> None:
    with Client(gpu_server.address, timeout=60) as client:
        blocks = client.model_info().attention_blocks
        prediction = client.classify(samples[0][0], attention="both")
    assert list(prediction.attention) == list(blocks)
    for kinds in prediction.attention.values():
        for values in kinds.values():
            assert np.isfinite(values).all() and values.min() >= 0 and values.max() <= 1


def test_cuda_memory_gauges_report_the_servers_device(gpu_server) -> None:
    with Client(gpu_server.address, timeout=60) as client:
        client.classify(np.zeros((32, 32, 3), dtype=np.uint8))
    samples = scrape(gpu_server.metrics_url)

    def by_device(name: str) -> dict[str, float]:
        return {dict(labels)["device"]: value for (n, labels), value in samples.items() if n == name}

    allocated = by_device("cbam_cuda_memory_allocated_bytes")
    reserved = by_device("cbam_cuda_memory_reserved_bytes")
    assert list(allocated) == list(reserved) == ["cuda:0"], samples.keys()
    assert 0 < allocated["cuda:0"] <= reserved["cuda:0"]
    info = {k: v for (n, labels), _ in samples.items() if n == "cbam_model_info" for k, v in labels}
    assert info["device"] == "cuda:0" and info["dtype"] == "float16"
