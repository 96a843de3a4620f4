"""The ceiling: how fast the served model runs in this process, with nothing but forward passes.

The model is built exactly as cbam-serve builds it (the default checkpoint, or a registered architecture
with seed-0 random weights and 1000 classes), in eval mode, float32, channels-last, under
torch.inference_mode, with the server's thread settings: intra-op threads = usable cores, inter-op 1.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "Ceiling",
    "CeilingMeter",
    "backend_callable",
    "build_model",
    "configure_threads",
    "make_inputs",
    "resolve_backend",
]


def usable_cores() -> int:
    """The cores this process may run on (the server's own count)."""
    from server.config import usable_cores as server_usable_cores

    return server_usable_cores()


def configure_threads() -> int:
    """The server's torch thread settings (server/tuning.py configure_torch_threads); returns the threads."""
    from server.tuning import configure_torch_threads

    configure_torch_threads()
    return torch.get_num_threads()


def build_model(arch: str | None, input_size: int | None = None) -> tuple[nn.Module, tuple[int, int], str]:
    """(model, (H, W), version) as cbam-serve loads it (its own load_model, on the CPU): `arch` None means
    the default checkpoint, else seed-0 random weights and 1000 classes. Eval mode, float32, and
    channels-last as the runner's default places it."""
    from server.config import ModelSettings
    from server.loading import load_model

    model, meta = load_model(ModelSettings(arch=arch, device="cpu"))
    model = model.to(memory_format=torch.channels_last)
    size = (input_size, input_size) if input_size is not None else tuple(meta.input_size)
    return model, size, meta.version


@dataclass
class Ceiling:
    """Forward-pass throughput (images/s) and latency (ms) by batch size, from the best window of passes.

    `round_latencies_ms` keeps each round's typical (median window) latency, to show the spread."""

    threads: int
    throughput: dict[int, float] = field(default_factory=dict)
    latency_ms: dict[int, float] = field(default_factory=dict)
    round_latencies_ms: dict[int, list[float]] = field(default_factory=dict)

    def throughput_at(self, batch_size: float) -> float:
        """Throughput at a (mean, so fractional) batch size: linear in log2(batch) between measured sizes."""
        sizes = sorted(self.throughput)
        if batch_size <= sizes[0]:
            return self.throughput[sizes[0]]
        if batch_size >= sizes[-1]:
            return self.throughput[sizes[-1]]
        upper = next(s for s in sizes if s >= batch_size)
        lower = max(s for s in sizes if s <= batch_size)
        if upper == lower:
            return self.throughput[upper]
        t = (math.log2(batch_size) - math.log2(lower)) / (math.log2(upper) - math.log2(lower))
        return self.throughput[lower] + t * (self.throughput[upper] - self.throughput[lower])

    def as_dict(self) -> dict:
        return {
            "threads": self.threads,
            "batch_1_latency_ms": self.latency_ms.get(1),
            "by_batch_size": {
                str(size): {
                    "throughput": self.throughput[size],
                    "latency_ms": self.latency_ms[size],
                    "round_latencies_ms": self.round_latencies_ms.get(size, []),
                }
                for size in sorted(self.throughput)
            },
        }


def make_inputs(input_size: tuple[int, int], batch_sizes: Iterable[int]) -> dict[int, torch.Tensor]:
    """Seed-0 random channels-last batches, one per size, in the order given."""
    generator = torch.Generator().manual_seed(0)
    return {
        size: torch.rand(size, 3, *input_size, generator=generator).to(memory_format=torch.channels_last)
        for size in batch_sizes
    }


class CeilingMeter:
    """Times forward passes at each batch size, in rounds the caller spreads over the benchmark.

    Each round visits every size for `seconds_per_size` (at least `min_passes` passes), in windows of
    `window` consecutive passes, and records each window's median. A size's ceiling is its best window
    over the whole run: on a shared machine other work slows some windows (two torch threads on two busy
    cores can take 100 times as long), and the best window is what the model does when it has the
    cores, which is what the server is compared with. cbam-bench runs a round before each server starts
    and one at the end, while no server is running.
    """

    def __init__(
        self,
        model: nn.Module,
        input_size: tuple[int, int],
        batch_sizes: Iterable[int],
        seconds_per_size: float = 0.5,
        min_passes: int = 2,
        window: int = 5,
        inputs: dict[int, object] | None = None,
    ) -> None:
        self.model = model
        self.threads = configure_threads()
        self.seconds_per_size = seconds_per_size
        self.min_passes = min_passes
        self.window = window
        # What `model` is called with at each size: by default seed-0 random float batches; the GPU
        # check passes device-resident batches, or lists of uint8 images for the runner's own path.
        self.inputs = inputs if inputs is not None else make_inputs(input_size, sorted(set(batch_sizes)))
        self.windows: dict[int, list[list[float]]] = {size: [] for size in self.inputs}  # per round
        with torch.inference_mode():
            for x in self.inputs.values():  # warm-up: first passes allocate and pick kernels
                model(x)

    def round(self) -> None:
        with torch.inference_mode():
            for size, x in self.inputs.items():
                times: list[float] = []
                started = time.perf_counter()
                while len(times) < self.min_passes or time.perf_counter() - started < self.seconds_per_size:
                    t0 = time.perf_counter()
                    self.model(x)
                    times.append(time.perf_counter() - t0)
                chunks = [times[i : i + self.window] for i in range(0, len(times), self.window)]
                if len(chunks) > 1 and len(chunks[-1]) < self.window:
                    short = chunks.pop()
                    chunks[-1] += short  # no window shorter than `window` passes
                self.windows[size].append([statistics.median(chunk) for chunk in chunks])

    def result(self) -> Ceiling:
        ceiling = Ceiling(threads=self.threads)
        for size, rounds in self.windows.items():
            best = min(min(medians) for medians in rounds)
            ceiling.throughput[size] = size / best
            ceiling.latency_ms[size] = best * 1000
            ceiling.round_latencies_ms[size] = [statistics.median(medians) * 1000 for medians in rounds]
        return ceiling


def resolve_backend(backend: str, input_size: tuple[int, int]) -> str:
    """``backend``, or for ``auto`` the one the server tries first on this CPU."""
    from server.backends import AUTO
    from server.backends.auto import auto_backend
    from server.backends.base import BackendTarget

    if backend != AUTO:
        return backend
    return auto_backend(BackendTarget(torch.device("cpu"), torch.float32, input_size))


def backend_callable(model, backend: str, input_size: tuple[int, int]):
    """What the ceiling times: the module itself, or the server's backend built from it (``backend`` a
    registered name, not auto: see resolve_backend), with the server's default artefact cache, so
    that an export or a compilation made here is not made again by the servers the bench starts."""
    if backend == "eager":
        return model
    from server.backends import create_backend  # the server's own code path, so the ceiling is its
    from server.backends.base import BackendTarget
    from server.backends.cache import ArtefactCache
    from server.config import default_cache_dir

    threads = configure_threads()
    cache = ArtefactCache(default_cache_dir())
    target = BackendTarget(torch.device("cpu"), torch.float32, input_size, threads, cache)
    built = create_backend(backend, model, target)
    return lambda x: built.run(x, None)[0]
