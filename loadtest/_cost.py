"""CBAM's cost: `cbam_resnet50` against plain `resnet50`, same backend, same process, interleaved.

The paper's CBAM adds about 0.2% multiply-adds and 10% parameters to a ResNet-50; in time it should cost
little more. Both models are built as cbam-serve builds them (seed-0 random weights, 1000 classes,
float32, channels-last, the server's thread settings and allocator) and timed doing nothing but forward
passes, alternating A, B / B, A round by round, so that whatever else the machine does falls on both.
Per batch size: each model's median forward, and the ratio as the median of the rounds' paired ratios.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from rich.table import Table

from ._ceiling import backend_callable, build_model, configure_threads, make_inputs

__all__ = ["COST_TARGET", "measure_cbam_cost", "cost_table"]

COST_TARGET = 1.10  # cbam_resnet50 forward over resnet50's, at batch 1 and at the best batch size
MODELS = ("cbam_resnet50", "resnet50")


def measure_cbam_cost(
    backend: str, batch_sizes: Sequence[int], rounds: int = 5, passes: int = 3, progress=None
) -> dict:
    """Forward latency of both models by batch size, their ratio, and the target judged on it."""
    threads = configure_threads()
    runnables, input_size = {}, None
    for arch in MODELS:
        model, input_size, _ = build_model(arch)
        runnables[arch] = backend_callable(model, backend, input_size)
    inputs = make_inputs(input_size, batch_sizes)
    times: dict[str, dict[int, list[list[float]]]] = {arch: {s: [] for s in inputs} for arch in MODELS}
    with torch.inference_mode():
        for arch in MODELS:  # warm-up: first passes allocate, pick kernels (and compile, for compile)
            for x in inputs.values():
                runnables[arch](x)
        for round_ in range(rounds):
            if progress is not None:
                progress(f"round {round_ + 1} of {rounds}")
            for size, x in inputs.items():
                order = MODELS if round_ % 2 == 0 else MODELS[::-1]
                for arch in order:
                    passes_ms = []
                    for _ in range(passes):
                        started = time.perf_counter()
                        runnables[arch](x)
                        passes_ms.append((time.perf_counter() - started) * 1000)
                    times[arch][size].append(passes_ms)

    by_size = {}
    for size in inputs:
        cbam = [statistics.median(r) for r in times["cbam_resnet50"][size]]
        plain = [statistics.median(r) for r in times["resnet50"][size]]
        ratios = [c / p for c, p in zip(cbam, plain, strict=True)]
        cbam_ms = statistics.median(cbam)
        by_size[size] = {
            "cbam_resnet50_ms": cbam_ms,
            "resnet50_ms": statistics.median(plain),
            "ratio": statistics.median(ratios),
            "round_ratios": ratios,
            "cbam_resnet50_images_per_s": size * 1000 / cbam_ms,
        }
    best = max(by_size, key=lambda s: by_size[s]["cbam_resnet50_images_per_s"])
    judged = [by_size[1], by_size[best]] if 1 in by_size else None
    return {
        "backend": backend,
        "threads": threads,
        "input_size": list(input_size),
        "rounds": rounds,
        "passes_per_round": passes,
        "by_batch_size": {str(size): figures for size, figures in by_size.items()},
        "best_batch_size": best,
        "target": f"cbam_resnet50 forward <= {COST_TARGET:.2f} x resnet50's at batch 1 and at the best batch",
        "met": None if judged is None else all(f["ratio"] <= COST_TARGET for f in judged),
    }


def cost_table(cost: dict) -> Table:
    table = Table(
        title=f"CBAM's cost: cbam_resnet50 vs resnet50, {cost['backend']}, {cost['threads']} thread(s), "
        f"{cost['input_size'][0]}x{cost['input_size'][1]}"
    )
    for column in ("batch", "cbam_resnet50 ms", "resnet50 ms", "ratio", "round ratios"):
        table.add_column(column, justify="right")
    for size, f in cost["by_batch_size"].items():
        best = " (best)" if int(size) == cost["best_batch_size"] else ""
        table.add_row(
            size + best,
            f"{f['cbam_resnet50_ms']:.2f}",
            f"{f['resnet50_ms']:.2f}",
            f"{f['ratio']:.3f}",
            " ".join(f"{r:.3f}" for r in f["round_ratios"]),
        )
    return table
