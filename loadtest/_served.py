"""The served side of the benchmark: cbam-serve as a subprocess, its /metrics, and the load generator."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from client import AsyncClient, CbamError, RetryPolicy

__all__ = ["LaunchedServer", "LoadResult", "drive_load", "scrape_batch_size"]


class LaunchedServer:
    """`python -m server` on free loopback ports, started and stopped by the benchmark.

    Waits for the server's JSON "serving" log line (on stderr) for its gRPC and metrics ports; the rest
    of its log is drained in a thread so the pipe never fills, and its tail is kept for error messages.
    """

    def __init__(self, args: list[str], startup_timeout: float = 300.0, checkout: Path | None = None) -> None:
        """``checkout``: run the server code of that source tree (a worktree of main, say), not this one."""
        self.checkout = checkout
        self.args = [
            sys.executable,
            "-m",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            "0",
            "--metrics.host",
            "127.0.0.1",
            "--metrics-port",
            "0",
            *args,
        ]
        self.startup_timeout = startup_timeout
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.serving: dict = {}  # the "serving" log record: backend, batching, threads, ...
        self._tail: collections.deque[str] = collections.deque(maxlen=40)
        self._process: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    @property
    def pid(self) -> int | None:
        return None if self._process is None else self._process.pid

    def __enter__(self) -> LaunchedServer:
        self.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def start(self) -> None:
        env = None
        if self.checkout is not None:  # its packages first on the path, its proto/ for the stubs
            path = [str(self.checkout), str(self.checkout / "proto"), os.environ.get("PYTHONPATH", "")]
            # No __pycache__ written into someone else's tree.
            env = {
                **os.environ,
                "PYTHONPATH": os.pathsep.join(p for p in path if p),
                "PYTHONDONTWRITEBYTECODE": "1",
            }
        self._process = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
            cwd=self.checkout, env=env,
        )  # fmt: skip
        found = threading.Event()
        self._reader = threading.Thread(target=self._read_log, args=(found,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not found.wait(0.1):
            if self._process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n".join(self._tail)
                raise RuntimeError(f"cbam-serve did not start ({' '.join(self.args[1:])}):\n{tail}")

    def _read_log(self, found: threading.Event) -> None:
        with self._process.stderr:  # closed when the log ends: the server has exited
            for line in self._process.stderr:
                self._tail.append(line.rstrip())
                if not found.is_set() and line.startswith("{"):
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if record.get("event") == "serving":
                        self.port, self.metrics_port = record["port"], record.get("metrics_port")
                        self.serving = record
                        found.set()

    def stop(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()  # SIGTERM: the server drains, then exits
            try:
                self._process.wait(30)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        if self._reader is not None:
            self._reader.join(10)  # it closes the log's pipe once the log ends


def scrape_batch_size(url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's cbam_batch_size histogram, or None without a metrics URL."""
    if not url:
        return None
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    values = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in ("cbam_batch_size_sum", "cbam_batch_size_count"):
            values[name] = float(value)
    if len(values) != 2:
        raise RuntimeError(f"{url} has no cbam_batch_size histogram")
    return values["cbam_batch_size_sum"], values["cbam_batch_size_count"]


@dataclass
class LoadResult:
    """What one load run measured, in its measuring window."""

    concurrency: int
    seconds: float
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
    to back over `channels` channels, for warm-up and then `seconds` of measurement; with
    `images_per_call` above 1, that many copies per ClassifyBatch call instead. Retries are off: an
    error counts (a failed image in a batch call counts as its call's error).

    Throughput counts the calls that finish inside the measuring window, latencies those that also
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
    start = time.perf_counter() + warmup_seconds
    end = start + seconds

    async def caller(client: AsyncClient) -> None:
        while (t0 := time.perf_counter()) < end:
            try:
                if images_per_call == 1:
                    predictions = [await client.classify(image, top_k=1)]
                else:
                    predictions = await client.classify_batch(batch, top_k=1)
            except CbamError as exc:
                if start <= t0:
                    result.errors[exc.code.name] += 1
                continue
            result.record(t0, time.perf_counter(), [p.timings.batch_size for p in predictions], start, end)

    async def window_edges() -> tuple:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        before = await loop.run_in_executor(None, scrape_batch_size, metrics_url)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        after = await loop.run_in_executor(None, scrape_batch_size, metrics_url)
        return before, after

    try:
        edges = asyncio.ensure_future(window_edges())
        await asyncio.gather(*(caller(clients[i % len(clients)]) for i in range(concurrency)))
        before, after = await edges
    finally:
        for client in clients:
            await client.close()
    if before is not None and after is not None and after[1] > before[1]:
        result.mean_batch_size_metrics = (after[0] - before[0]) / (after[1] - before[1])
    return result
