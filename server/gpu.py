"""Where the GPU figures come from (server/metrics.py's GpuCollector shows them): NVML when nvidia-ml-py
is installed (utilisation and memory of the device), else torch (memory only: torch reads utilisation
through NVML too).

    read = gpu_reader(torch.device("cuda:0"))      # None on a CPU server
    read()  ->  [GpuReading(device="cuda:0", utilization=0.93, memory_used_bytes=..., memory_total_bytes=...)]
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

__all__ = ["GpuReading", "NvmlSource", "TorchSource", "gpu_reader"]

_log = logging.getLogger(__name__)


class GpuReading(NamedTuple):
    device: str  # as the server names it: "cuda:0"
    utilization: float | None  # 0..1 over NVML's last sample period; None without NVML
    memory_used_bytes: float
    memory_total_bytes: float


class NvmlSource:
    """Reads devices through NVML (``nvml`` is the pynvml module of nvidia-ml-py). ``devices`` maps the
    server's device name to its NVML handle."""

    def __init__(self, nvml: Any, devices: dict[str, Any]) -> None:
        self._nvml = nvml
        self._devices = devices

    @classmethod
    def open(cls, nvml: Any, devices: dict[str, int]) -> NvmlSource:
        """``devices`` maps the server's device name to its CUDA index. NVML numbers devices without
        regard to CUDA_VISIBLE_DEVICES, so each is found by the UUID CUDA reports for it."""
        nvml.nvmlInit()
        handles = {}
        for name, index in devices.items():
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            try:
                handles[name] = nvml.nvmlDeviceGetHandleByUUID(
                    uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                )
            except nvml.NVMLError:
                handles[name] = nvml.nvmlDeviceGetHandleByIndex(index)  # right when nothing is hidden
        return cls(nvml, handles)

    def __call__(self) -> list[GpuReading]:
        readings = []
        for name, handle in self._devices.items():
            memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            busy = self._nvml.nvmlDeviceGetUtilizationRates(handle).gpu  # percent
            readings.append(GpuReading(name, busy / 100.0, float(memory.used), float(memory.total)))
        return readings


class TorchSource:
    """Reads device memory through torch's CUDA runtime (``cuda`` is torch.cuda); no utilisation."""

    def __init__(self, cuda: Any, devices: dict[str, int]) -> None:
        self._cuda = cuda
        self._devices = devices

    def __call__(self) -> list[GpuReading]:
        readings = []
        for name, index in self._devices.items():
            free, total = self._cuda.mem_get_info(index)
            readings.append(GpuReading(name, None, float(total - free), float(total)))
        return readings


def gpu_reader(device: torch.device) -> Callable[[], list[GpuReading]] | None:
    """The figures of ``device`` (None unless it is a CUDA device): NVML's if it can be used, else torch's."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    devices = {f"cuda:{index}": index}
    try:
        import pynvml  # nvidia-ml-py: the gpu extra

        return NvmlSource.open(pynvml, devices)
    except Exception as exc:  # not installed, or no NVML library on this host
        _log.info("GPU utilisation not reported: NVML unavailable", extra={"fields": {"error": repr(exc)}})
    return TorchSource(torch.cuda, devices)
