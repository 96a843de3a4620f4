"""The load generator of the benchmark, and the batch sizes the served side reports on its /metrics.

The servers the benchmark starts are server.launcher.ServerProcess children.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from dataclasses import dataclass, field

import numpy as np

from client import AsyncClient, CbamError, RetryPolicy
from server.launcher import scrape

__all__ = ["LoadResult", "drive_load", "scrape_batch_size"]


def scrape_batch_size(url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's cbam_batch_size histogram, or None without a metrics URL."""
    if not url:
        return None
    samples = scrape(url)
    if ("cbam_batch_size_count", frozenset()) not in samples:
        raise RuntimeError(f"{url} has no cbam_batch_size histogram")
    return samples.value("cbam_batch_size_sum"), samples.value("cbam_batch_size_count")


@dataclass
class LoadResult:
    """What one load run measured, in its measuring window."""

    concurrency: int
    seconds: float  # the window's length
    images_per_call: int = 1
    completed_calls: int = 0  # successful calls that finished inside the window, wherever they started
    latencies: list[float] = field(default_factory=list)  # seconds, successful calls wholly inside it
    batch_sizes: list[int] = field(default_factory=list)  # timings.batch_size of each image answered
    errors: collections.Counter = field(default_factory=collections.Counter)  # status name -> count
    mean_batch_size_metrics: float | None = None  # from /metrics: forward passes' mean size

    def record(
        self, started: float, finished: float, batch_sizes: list[int], start: float, end: float
    ) -> None:
        """One successful call. Throughput counts every call that finished inside the window [start,
        end] (as a counter scraped at its edges would); latencies only those that also started in it.
        Counting only the latter undercounts by latency / window: at 64 callers of a 3 s call in a 10 s
        window it reported a third less than the server did."""
        if start <= finished <= end:
            self.completed_calls += 1
            if start <= started:
                self.latencies.append(finished - started)
                self.batch_sizes.extend(batch_sizes)

    def summary(self) -> dict:
        """The figures of the window; latencies and batch size are None when no call finished in it."""
        p50 = p95 = p99 = per_request = None
        if self.latencies:
            p50, p95, p99 = (float(p) for p in np.percentile(np.asarray(self.latencies) * 1000, [50, 95, 99]))
            per_request = float(np.mean(self.batch_sizes))
        from_metrics = self.mean_batch_size_metrics is not None
        return {
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "requests": self.completed_calls,
            "images_per_call": self.images_per_call,
            "throughput": self.completed_calls * self.images_per_call / self.seconds,
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "mean_batch_size": self.mean_batch_size_metrics if from_metrics else per_request,
            "mean_batch_size_source": "metrics" if from_metrics else "timings",
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
        }


async def drive_load(
    target: str,
    image: np.ndarray | bytes,
    *,
    concurrency: int,
    seconds: float,
    warmup_seconds: float,
    channels: int = 1,
    timeout: float = 60.0,
    metrics_url: str | None = None,
    images_per_call: int = 1,
) -> LoadResult:
    """`concurrency` tasks, each sending `image` (a uint8 H x W x 3 array, or PNG bytes) by Classify back
    to back over `channels` channels, through a warm-up and then a measuring window; with
    `images_per_call` above 1, that many copies per ClassifyBatch call instead. Retries are off: an
    error counts (a failed image in a batch call counts as its call's error).

    The warm-up lasts `warmup_seconds`, and until every task has had its first answer. The window lasts
    `seconds`, and longer if no call has yet started and finished inside it (at most `timeout` longer),
    so that a slow machine measures something rather than nothing; its real length is the result's
    `seconds`. Throughput counts the calls that finish inside the window, latencies those that also
    start in it; the batch-size histogram is read at the window's two edges.
    """
    # A local subchannel pool gives each channel its own connection, instead of gRPC sharing one.
    clients = [
        AsyncClient(
            target, timeout=timeout, retry=RetryPolicy.none(), options=[("grpc.use_local_subchannel_pool", 1)]
        )
        for _ in range(max(1, min(channels, concurrency)))
    ]
    result = LoadResult(concurrency, seconds, images_per_call)
    batch = [image] * images_per_call
    loop = asyncio.get_running_loop()
    start = end = math.inf  # the window, once the timekeeper opens and closes it
    first_answers = 0
    warm, measured = asyncio.Event(), asyncio.Event()

    async def caller(client: AsyncClient) -> None:
        nonlocal first_answers
        answered = False
        while (t0 := time.perf_counter()) < end:
            try:
                if images_per_call == 1:
                    predictions = [await client.classify(image, top_k=1)]
                else:
                    predictions = await client.classify_batch(batch, top_k=1)
            except CbamError as exc:
                if start <= t0:
                    result.errors[exc.code.name] += 1
            else:
                sizes = [p.timings.batch_size for p in predictions]
                result.record(t0, time.perf_counter(), sizes, start, end)
                if result.latencies:
                    measured.set()
            if not answered:
                answered, first_answers = True, first_answers + 1
                if first_answers == concurrency:
                    warm.set()

    async def timekeeper() -> tuple:
        nonlocal start, end
        try:
            await asyncio.gather(asyncio.sleep(warmup_seconds), warm.wait())
            # Read first, then open: every forward of a call started in the window comes after it.
            before = await loop.run_in_executor(None, scrape_batch_size, metrics_url)
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            # Nothing finished in the window even then: the summary says so (no latencies).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(measured.wait(), timeout)
        finally:
            end = time.perf_counter()  # the callers stop, whatever happened here
        after = await loop.run_in_executor(None, scrape_batch_size, metrics_url)
        return before, after

    edges = asyncio.ensure_future(timekeeper())
    try:
        await asyncio.gather(*(caller(clients[i % len(clients)]) for i in range(concurrency)))
        before, after = await edges
    finally:
        edges.cancel()
        for client in clients:
            await client.close()
    result.seconds = end - start
    if before is not None and after is not None and after[1] > before[1]:
        result.mean_batch_size_metrics = (after[0] - before[0]) / (after[1] - before[1])
    return result
