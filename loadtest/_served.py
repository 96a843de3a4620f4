"""The load generator of the benchmark, and the server's own counters it reads at a window's edges
(/metrics, and the CPU time of its processes). The servers it starts are server.launcher.ServerProcess
children.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client import AsyncClient, CbamError, RetryPolicy
from server.launcher import scrape

__all__ = ["LoadResult", "ServerCounters", "drive_load", "read_counters"]

# The operating-system name of the server's forward thread (server.pipeline.INFERENCE_THREAD; not
# imported, so that measuring a server does not load it).
INFERENCE_THREAD = "cbam-inference"


@dataclass(frozen=True)
class ServerCounters:
    """The server's cumulative counters at one instant, summed over its workers: from /metrics, and from
    /proc when its processes run on this machine (their CPU time, and that of their forward threads)."""

    batch_size_sum: float
    batches: float
    forward_seconds: float  # cbam_stage_duration_seconds{stage="inference"}: forwards' wall time
    images_by_worker: dict[str, float]  # images answered OK, by worker label ("" for a single process)
    cpu_seconds: float | None = None
    forward_cpu_seconds: float | None = None


def read_counters(url: str | None, pids: Sequence[int] = ()) -> ServerCounters | None:
    """The counters now, or None without a metrics URL. ``pids``: the server's processes (the supervisor
    and every worker) whose CPU time to read."""
    if not url:
        return None
    batch_sum = batches = forward = 0.0
    images: dict[str, float] = collections.defaultdict(float)
    seen = False
    for (name, label_items), value in scrape(url).items():
        labels = dict(label_items)
        if name == "cbam_batch_size_sum":
            batch_sum, seen = batch_sum + value, True
        elif name == "cbam_batch_size_count":
            batches += value
        elif name == "cbam_stage_duration_seconds_sum" and labels.get("stage") == "inference":
            forward += value
        elif name == "cbam_images_total" and labels.get("code") == "OK":
            images[labels.get("worker", "")] += value
    if not seen:
        raise RuntimeError(f"{url} has no cbam_batch_size histogram")
    cpu = _cpu_seconds(pids) if pids else None
    return ServerCounters(
        batch_sum, batches, forward, dict(images), *(cpu if cpu is not None else (None, None))
    )


def _cpu_seconds(pids: Sequence[int]) -> tuple[float, float] | None:
    """(user+system seconds of the processes, of their threads named INFERENCE_THREAD); None off Linux."""
    tick = os.sysconf("SC_CLK_TCK")
    total = forward = 0.0
    try:
        for pid in pids:
            total += _stat_seconds(Path(f"/proc/{pid}/stat"), tick)  # every thread's, even finished ones
            for task in Path(f"/proc/{pid}/task").iterdir():
                try:
                    if (task / "comm").read_text().strip() == INFERENCE_THREAD:
                        forward += _stat_seconds(task / "stat", tick)
                except FileNotFoundError:  # the thread ended meanwhile
                    continue
    except FileNotFoundError:
        return None
    return total, forward


def _stat_seconds(path: Path, tick: int) -> float:
    fields = path.read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of proc(5))


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
    before: ServerCounters | None = None  # the server's counters at the window's edges
    after: ServerCounters | None = None

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
        figures = self._server_figures()
        from_metrics = figures.get("mean_batch_size") is not None
        mean_batch_size = figures.pop("mean_batch_size") if from_metrics else per_request
        return {
            "concurrency": self.concurrency,
            "seconds": self.seconds,
            "requests": self.completed_calls,
            "images_per_call": self.images_per_call,
            "throughput": self.completed_calls * self.images_per_call / self.seconds,
            "p50": p50,
            "p95": p95,
            "p99": p99,
            "mean_batch_size": mean_batch_size,
            "mean_batch_size_source": "metrics" if from_metrics else "timings",
            "errors": sum(self.errors.values()),
            "error_codes": dict(self.errors),
            **figures,
        }

    def _server_figures(self) -> dict:
        """What the server's own counters say about the window: mean batch, each worker's share of the
        images, and its CPU time per image, all of it and outside the forward (None where unknown)."""
        b, a = self.before, self.after
        if b is None or a is None or a.batches <= b.batches:
            return {}
        images = {w: n - b.images_by_worker.get(w, 0.0) for w, n in a.images_by_worker.items()}
        total = sum(images.values())
        figures: dict = {"mean_batch_size": (a.batch_size_sum - b.batch_size_sum) / (a.batches - b.batches)}
        if not total:
            return figures
        figures["worker_share"] = {w: n / total for w, n in sorted(images.items())}
        figures["forward_wall_ms_per_image"] = 1000 * (a.forward_seconds - b.forward_seconds) / total
        if a.cpu_seconds is not None and b.cpu_seconds is not None:
            cpu = a.cpu_seconds - b.cpu_seconds
            forward = a.forward_cpu_seconds - b.forward_cpu_seconds  # type: ignore[operator]
            figures |= {
                "server_cores_used": cpu / self.seconds,
                "server_cpu_ms_per_image": 1000 * cpu / total,
                "forward_cpu_ms_per_image": 1000 * forward / total,
                "outside_forward_cpu_ms_per_image": 1000 * (cpu - forward) / total,
            }
        return figures


async def _spread_over_workers(clients: list[AsyncClient], connect, attempts: int = 64) -> list[AsyncClient]:
    """Reconnect the connections that landed on a worker holding more than its share, until the workers
    hold them evenly (or ``attempts`` run out). The kernel gives each new connection to a worker by a
    hash, so 8 connections to 2 workers split 6:2 or worse 29% of the time, and the benchmark would
    measure that split rather than the server."""
    landed = [(await client.model_info()).worker for client in clients]
    workers = len((await clients[0].model_info()).workers) or 1
    fair = -(-len(clients) // workers)  # ceil
    for _ in range(attempts):
        counts = collections.Counter(landed)
        crowded = next((i for i, w in enumerate(landed) if counts[w] > fair), None)
        if crowded is None:
            break
        await clients[crowded].close()
        clients[crowded] = connect()
        landed[crowded] = (await clients[crowded].model_info()).worker
    return clients


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
    server_pids: Sequence[int] = (),
) -> LoadResult:
    """`concurrency` tasks, each sending `image` (a uint8 H x W x 3 array, or PNG bytes) by Classify back
    to back over `channels` channels, through a warm-up and then a measuring window; with
    `images_per_call` above 1, that many copies per ClassifyBatch call instead. Retries are off: an
    error counts (a failed image in a batch call counts as its call's error).

    The warm-up lasts `warmup_seconds`, and until every task has had its first answer. The window lasts
    `seconds`, and longer if no call has yet started and finished inside it (at most `timeout` longer),
    so that a slow machine measures something rather than nothing; its real length is the result's
    `seconds`. Throughput counts the calls that finish inside the window, latencies those that also
    start in it; the server's counters (/metrics, and the CPU time of ``server_pids``) are read at the
    window's two edges.
    """
    def connect() -> AsyncClient:
        # A local subchannel pool gives each channel its own connection, instead of gRPC sharing one.
        options = [("grpc.use_local_subchannel_pool", 1)]
        return AsyncClient(target, timeout=timeout, retry=RetryPolicy.none(), options=options)

    clients = [connect() for _ in range(max(1, min(channels, concurrency)))]
    clients = await _spread_over_workers(clients, connect)
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
            before = await loop.run_in_executor(None, read_counters, metrics_url, server_pids)
            start = time.perf_counter()
            await asyncio.sleep(seconds)
            # Nothing finished in the window even then: the summary says so (no latencies).
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(measured.wait(), timeout)
        finally:
            end = time.perf_counter()  # the callers stop, whatever happened here
        after = await loop.run_in_executor(None, read_counters, metrics_url, server_pids)
        return before, after

    edges = asyncio.ensure_future(timekeeper())
    try:
        await asyncio.gather(*(caller(clients[i % len(clients)]) for i in range(concurrency)))
        result.before, result.after = await edges
    finally:
        edges.cancel()
        for client in clients:
            await client.close()
    result.seconds = end - start
    return result
