"""GPU figures (server/gpu.py, server/metrics.py's GpuCollector), with the NVML and torch sources given
fakes: there is no GPU here. On a real device, NVML's and torch's answers are unverified by these tests."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.gpu import GpuReading, NvmlSource, TorchSource
from server.metrics import ServerMetrics

GIB = 1024**3


def _samples(metrics: ServerMetrics) -> dict[tuple[str, str], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (sample.name, sample.labels.get("device", "")): sample.value
        for family in text_string_to_metric_families(text)
        if family.name.startswith("cbam_gpu_")
        for sample in family.samples
    }


def test_the_collector_reads_every_device_at_each_scrape():
    reads = []

    def read():
        reads.append(1)
        return [GpuReading("cuda:0", 0.5, 3 * GIB, 16 * GIB), GpuReading("cuda:1", None, 1 * GIB, 16 * GIB)]

    metrics = ServerMetrics()
    metrics.watch_gpus(read)
    assert reads == []  # registering reads nothing: a scrape does
    samples = _samples(metrics)
    assert samples == {
        ("cbam_gpu_utilization_ratio", "cuda:0"): 0.5,  # no figure for a device only torch reads
        ("cbam_gpu_memory_used_bytes", "cuda:0"): 3 * GIB,
        ("cbam_gpu_memory_used_bytes", "cuda:1"): 1 * GIB,
        ("cbam_gpu_memory_total_bytes", "cuda:0"): 16 * GIB,
        ("cbam_gpu_memory_total_bytes", "cuda:1"): 16 * GIB,
    }
    _samples(metrics)
    assert len(reads) == 2


def test_a_gpu_that_cannot_be_read_leaves_its_figures_out_not_the_scrape(caplog):
    def broken():
        raise RuntimeError("NVML: GPU is lost")

    metrics = ServerMetrics()
    metrics.watch_gpus(broken)
    for _ in range(2):
        assert _samples(metrics) == {}
        assert b"cbam_inflight_requests" in generate_latest(metrics.registry)
    warnings = [r.message for r in caplog.records]
    assert warnings.count("cannot read the GPU figures") == 1  # once, not at every scrape


class _FakeNvml:
    """What NvmlSource uses of pynvml, answering for two devices."""

    class NVMLError(Exception):
        pass

    def __init__(self) -> None:
        self.devices = {"GPU-aaaa": "handle-a", "GPU-bbbb": "handle-b"}

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        pass

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        if uuid not in self.devices:
            raise self.NVMLError(uuid)
        return self.devices[uuid]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        return sorted(self.devices.values())[index]

    def nvmlDeviceGetMemoryInfo(self, handle: str):  # noqa: N802
        used = {"handle-a": 2 * GIB, "handle-b": 5 * GIB}[handle]
        return SimpleNamespace(used=used, total=24 * GIB, free=24 * GIB - used)

    def nvmlDeviceGetUtilizationRates(self, handle: str):  # noqa: N802
        return SimpleNamespace(gpu={"handle-a": 87, "handle-b": 3}[handle], memory=10)


def test_nvml_reads_utilisation_in_percent_and_memory_per_handle():
    nvml = _FakeNvml()
    read = NvmlSource(nvml, {"cuda:0": "handle-b", "cuda:1": "handle-a"})
    assert read() == [
        GpuReading("cuda:0", 0.03, 5 * GIB, 24 * GIB),
        GpuReading("cuda:1", 0.87, 2 * GIB, 24 * GIB),
    ]


def test_nvml_finds_the_device_cuda_means_by_uuid(monkeypatch):
    # CUDA_VISIBLE_DEVICES=1 makes NVML's second device CUDA's cuda:0: the UUID says which it is.
    properties = {0: SimpleNamespace(uuid="bbbb")}
    monkeypatch.setattr("torch.cuda.get_device_properties", lambda index: properties[index])
    nvml = _FakeNvml()
    read = NvmlSource.open(nvml, {"cuda:0": 0})
    assert read() == [GpuReading("cuda:0", 0.03, 5 * GIB, 24 * GIB)]
    properties[0] = SimpleNamespace(uuid="unknown")  # no such UUID: NVML's index is the best guess
    assert NvmlSource.open(nvml, {"cuda:0": 0})()[0].memory_used_bytes == 2 * GIB


def test_torch_reads_memory_only():
    cuda = SimpleNamespace(mem_get_info=lambda index: ({0: 6 * GIB}[index], 16 * GIB))
    assert TorchSource(cuda, {"cuda:0": 0})() == [GpuReading("cuda:0", None, 10 * GIB, 16 * GIB)]
