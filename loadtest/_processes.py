"""The load generator in several processes: `drive_load`, once per process, its callers shared out.

One asyncio process is one Python core of load (client, protobuf, event loop); in front of a GPU that
caps the served figures long before the server does. The processes are spawned once (no torch or CUDA
state is inherited) and serve every load point; each measures its own window after its own warm-up,
and the windows of processes started together overlap.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from ._served import LoadResult, drive_load

__all__ = ["LoadProcesses", "merge_results"]


class LoadProcesses:
    """`processes` load-generator processes, reused for every load point.

    with LoadProcesses(4) as load:
        result = load.drive(target, image, concurrency=128, seconds=2, warmup_seconds=0.5)
    """

    def __init__(self, processes: int) -> None:
        if processes < 1:
            raise ValueError(f"processes should be >= 1, got {processes}")
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None

    def __enter__(self) -> LoadProcesses:
        self._pool = ProcessPoolExecutor(self.processes, mp_context=multiprocessing.get_context("spawn"))
        # Submitted together, these start every process now rather than in the first measured window.
        for future in [self._pool.submit(time.sleep, 0.2) for _ in range(self.processes)]:
            future.result()
        return self

    def __exit__(self, *exc_info) -> None:
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
            self._pool = None

    def drive(
        self,
        target: str,
        image: np.ndarray | bytes,
        *,
        concurrency: int,
        metrics_url: str | None = None,
        **kwargs,
    ) -> LoadResult:
        """`drive_load(target, image, concurrency=..., **kwargs)` with the callers shared out among the
        processes (at most one process per caller); only the first reads /metrics."""
        if self._pool is None:
            raise RuntimeError("use LoadProcesses as a context manager: `with LoadProcesses(n) as load:`")
        parts = min(self.processes, concurrency)
        shares = [concurrency // parts + (1 if i < concurrency % parts else 0) for i in range(parts)]
        futures = [
            self._pool.submit(
                _drive,
                target,
                image,
                {**kwargs, "concurrency": share, "metrics_url": metrics_url if i == 0 else None},
            )
            for i, share in enumerate(shares)
        ]
        return merge_results([future.result() for future in futures])


def _drive(target: str, image: np.ndarray | bytes, kwargs: dict) -> LoadResult:
    return asyncio.run(drive_load(target, image, **kwargs))


def merge_results(results: list[LoadResult]) -> LoadResult:
    """One result of generators that ran side by side: their calls, latencies and errors together, and
    a window length that makes the throughput the sum of theirs (their own length, when they agree)."""
    merged = LoadResult(sum(r.concurrency for r in results), results[0].seconds, results[0].images_per_call)
    for r in results:
        merged.completed_calls += r.completed_calls
        merged.latencies.extend(r.latencies)
        merged.batch_sizes.extend(r.batch_sizes)
        merged.errors.update(r.errors)
    rate = sum(r.completed_calls / r.seconds for r in results)
    if rate > 0:
        merged.seconds = merged.completed_calls / rate
    scraped = next((r for r in results if r.before is not None), None)  # the one that read the server
    if scraped is not None:
        merged.before, merged.after = scraped.before, scraped.after
    return merged
