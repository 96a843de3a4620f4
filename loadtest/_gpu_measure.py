"""What the GPU check measures: the in-process ceilings and the cost of attention maps for one model and
dtype, and one served configuration under load, with the server's CUDA memory."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from server.launcher import ServerProcess, scrape

if TYPE_CHECKING:  # _ceiling imports torch, which the load processes spawned by the check need not load
    from ._ceiling import Ceiling
    from ._processes import LoadProcesses

__all__ = ["CUDA_GAUGES", "measure_in_process", "read_cuda_memory", "release_device_memory", "serve_and_load"]

CUDA_GAUGES = ("cbam_cuda_memory_allocated_bytes", "cbam_cuda_memory_reserved_bytes")


def measure_in_process(
    arch: str | None,
    dtype: str,
    *,
    device: str,
    ceiling_sizes: tuple[int, ...],
    attention_sizes: tuple[int, ...],
    seconds: float,
) -> dict:
    """In this process, for `arch` (None: the default checkpoint) in `dtype` on `device`:

    - "forward": the ceiling of the bare forward on a float batch already on the device;
    - "uint8": the ceiling of the server's own batch path, ModelRunner.run_batch, from uint8 pixels;
    - "ceilings": both as report records, by batch size;
    - "attention": run_batch with every block's maps against without, at `attention_sizes`.
    """
    import torch

    from server.config import ModelSettings
    from server.loading import load_model, resolve_device, resolve_dtype
    from server.runner import BatchItem, ModelRunner
    from server.tuning import configure_malloc

    from ._ceiling import CeilingMeter, make_inputs

    configure_malloc()  # as the server does
    sizes = sorted(set(ceiling_sizes) | set(attention_sizes))
    settings = ModelSettings(arch=arch, device=device, dtype=dtype)
    on = resolve_device(settings.device)
    model, meta = load_model(settings)
    # Eager, so the two ceilings time the same module; the runner places it on the device (in place).
    dtype_ = resolve_dtype(settings.dtype, on)
    runner = ModelRunner(model, meta, device=on, dtype=dtype_, backend="eager", max_batch_size=max(sizes))
    input_size = runner.description.input_size

    def forward(x: torch.Tensor) -> None:
        model(x)
        if on.type == "cuda":
            torch.cuda.synchronize(on)  # the forward is asynchronous: time it to its end

    floats = {
        size: x.to(device=on, dtype=runner.dtype)
        for size, x in make_inputs(input_size, ceiling_sizes).items()
    }
    pixels = torch.randint(0, 256, (max(sizes), *input_size, 3), dtype=torch.uint8)
    blocks = frozenset(runner.description.attention_blocks)
    meters = {
        "forward": CeilingMeter(forward, input_size, (), seconds, inputs=floats),
        "uint8": CeilingMeter(
            runner.run_batch, input_size, (), seconds,
            inputs={size: [BatchItem(p) for p in pixels[:size]] for size in sizes},
        ),
        "maps": CeilingMeter(
            runner.run_batch, input_size, (), seconds,
            inputs={size: [BatchItem(p, blocks) for p in pixels[:size]] for size in attention_sizes},
        ),
    }  # fmt: skip
    for _ in range(2):  # two rounds, interleaved, so that a slow spell falls on every meter
        for meter in meters.values():
            meter.round()
    found = {kind: meter.result() for kind, meter in meters.items()}
    model = arch or "default"
    labels = {"forward": "float batch on the device, forward only", "uint8": "uint8 pixels through run_batch"}
    without, with_maps = found["uint8"], found["maps"]
    return {
        "forward": found["forward"],
        "uint8": found["uint8"],
        "ceilings": [
            {"model": model, "dtype": dtype, "device": str(on), "input_size": list(input_size),
             "input": label, "kind": kind, **found[kind].as_dict()}
            for kind, label in labels.items()
        ],
        "attention": {
            "model": model, "dtype": dtype, "blocks": len(blocks),
            "by_batch_size": {
                str(size): {
                    "without_maps_ms": without.latency_ms[size],
                    "with_maps_ms": with_maps.latency_ms[size],
                    "ratio": with_maps.latency_ms[size] / without.latency_ms[size],
                }
                for size in attention_sizes
            },
        },
    }  # fmt: skip


def release_device_memory() -> None:
    """Give back what the in-process runners held, so that the servers started next get the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def serve_and_load(
    record: dict,
    flags: list[str],
    *,
    device: str,
    dtype: str,
    concurrency: tuple[int, ...],
    duration: float,
    warmup: float,
    ceiling: Ceiling | None,
    load: LoadProcesses,
    startup_timeout: float,
) -> None:
    """Start cbam-serve with `flags`, check it runs `dtype` on `device`, drive each concurrency, read its
    CUDA memory; every figure goes into `record` as it comes. Raises when a call failed or a figure is
    missing, after stopping the server."""
    import numpy as np

    from client import Client

    server = ServerProcess(*flags, startup_timeout=startup_timeout)
    record["flags"] = server.args
    started = time.monotonic()
    try:
        server.start()
    except (RuntimeError, TimeoutError) as exc:  # ServerExited is a RuntimeError
        raise RuntimeError(f"not SERVING within {startup_timeout:.0f} s, or it exited: {exc}") from None
    try:
        record["time_to_serving_s"] = time.monotonic() - started
        with Client(server.address, timeout=60) as client:
            info = client.model_info()
        record.update(served_device=info.device, served_dtype=info.dtype)
        record["max_batch_size"] = info.batching.max_batch_size
        if info.dtype != dtype or not info.device.startswith(device):
            raise RuntimeError(f"asked for {device} {dtype}, the server runs {info.device} {info.dtype}")
        record["ceiling"] = (
            None if ceiling is None else "in-process, eager, same model and dtype, uint8 input"
        )
        image = np.random.default_rng(0).integers(0, 256, (*info.input_size, 3), dtype=np.uint8)
        rows = record["rows"] = []
        for callers in concurrency:
            result = load.drive(
                server.address, image, concurrency=callers, seconds=duration, warmup_seconds=warmup,
                metrics_url=server.metrics_url,
            )  # fmt: skip
            rows.append(_row(result.summary(), ceiling, record["max_batch_size"]))
        record["memory"] = read_cuda_memory(server.metrics_url)
    finally:
        server.stop()  # SIGTERM: it drains (and is killed if it takes too long)
        server.kill()  # whatever is left of its process group
    errors = {code: n for row in rows for code, n in row["error_codes"].items()}
    if errors:
        raise RuntimeError(f"calls failed: {errors}")
    if device == "cuda" and not record["memory"]:
        raise RuntimeError(f"the server's /metrics has none of {CUDA_GAUGES}")


def _row(summary: dict, ceiling: Ceiling | None, max_batch_size: int) -> dict:
    """A load point's figures, with served over the ceiling at the same mean batch size, and over the
    ceiling's best batch that this max_batch_size allows."""
    row = {key: summary[key] for key in ("concurrency", "throughput", "p50", "p99", "mean_batch_size")}
    row.update(requests=summary["requests"], errors=summary["errors"], error_codes=summary["error_codes"])
    batch = summary["mean_batch_size"]
    if ceiling is None or batch is None:
        row.update(ceiling_throughput=None, efficiency=None, of_best_ceiling=None)
        return row
    allowed = [t for size, t in ceiling.throughput.items() if size <= max_batch_size]
    row["ceiling_throughput"] = ceiling.throughput_at(batch)
    row["efficiency"] = summary["throughput"] / row["ceiling_throughput"]
    row["of_best_ceiling"] = summary["throughput"] / max(allowed) if allowed else None
    return row


def read_cuda_memory(metrics_url: str) -> dict:
    """The server's CUDA memory gauges: {labels: {allocated_bytes, reserved_bytes}}, one entry per device
    (and per worker, should workers label them)."""
    memory: dict = {}
    for (name, labels), value in scrape(metrics_url).items():
        if name in CUDA_GAUGES:
            key = ",".join(f"{k}={v}" for k, v in sorted(labels))
            memory.setdefault(key, {})[name.removeprefix("cbam_cuda_memory_")] = value
    return memory
