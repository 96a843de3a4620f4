"""The served side of the benchmark: cbam-serve as a subprocess, its /metrics, and the load generator."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np

from client import AsyncClient, CbamError, RetryPolicy

__all__ = ["PROTOCOLS", "LaunchedServer", "LoadResult", "drive_load", "oip_model_name", "scrape_batch_size"]

PROTOCOLS = ("cbam", "oip")  # cbam.v1 Classify / ClassifyBatch; the Open Inference Protocol's ModelInfer
_MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


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
        if self.batch_sizes:  # ModelInfer answers carry no timings: only /metrics knows its batches
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
    protocol: str = "cbam",
    model_name: str = "",
) -> LoadResult:
    """`concurrency` tasks, each sending `image` (a uint8 H x W x 3 array, or PNG bytes) back to back over
    `channels` channels, for warm-up and then `seconds` of measurement. With protocol "cbam": one
    Classify per call or, with `images_per_call` above 1, that many copies per ClassifyBatch call; with
    "oip": one ModelInfer of `model_name` per call, its `images_per_call` copies as one tensor (UINT8
    [N, H, W, 3], or BYTES [N, 1] for PNG), asking for the top class. Retries are off: an error counts
    (a failed image in a batch call counts as its call's error).

    Throughput counts the calls that finish inside the measuring window, latencies those that also
    start in it; the batch-size histogram is read at the window's two edges.
    """
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol should be one of {PROTOCOLS}, got {protocol!r}")
    result = LoadResult(concurrency, seconds, images_per_call)
    count = max(1, min(channels, concurrency))
    make = _oip_senders if protocol == "oip" else _cbam_senders
    senders, close = make(target, image, count, timeout, images_per_call, model_name)
    loop = asyncio.get_running_loop()
    start = time.perf_counter() + warmup_seconds
    end = start + seconds

    async def caller(send: Callable[[], Awaitable[list[int]]]) -> None:
        while (t0 := time.perf_counter()) < end:
            try:
                batch_sizes = await send()
            except (CbamError, grpc.aio.AioRpcError) as exc:
                if start <= t0:
                    code = exc.code if isinstance(exc, CbamError) else exc.code()
                    result.errors[code.name] += 1
                continue
            result.record(t0, time.perf_counter(), batch_sizes, start, end)

    async def window_edges() -> tuple:
        await asyncio.sleep(max(0.0, start - time.perf_counter()))
        before = await loop.run_in_executor(None, scrape_batch_size, metrics_url)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        after = await loop.run_in_executor(None, scrape_batch_size, metrics_url)
        return before, after

    try:
        edges = asyncio.ensure_future(window_edges())
        await asyncio.gather(*(caller(senders[i % len(senders)]) for i in range(concurrency)))
        before, after = await edges
    finally:
        await close()
    if before is not None and after is not None and after[1] > before[1]:
        result.mean_batch_size_metrics = (after[0] - before[0]) / (after[1] - before[1])
    return result


# A local subchannel pool gives each channel its own connection, instead of gRPC sharing one.
_OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)


def _cbam_senders(target: str, image, count: int, timeout: float, images_per_call: int, model_name: str):
    """One Classify (or ClassifyBatch) sender per client.AsyncClient; each returns its images' batch sizes."""
    clients = [AsyncClient(target, timeout=timeout, retry=RetryPolicy.none(), options=[_OWN_CONNECTION])
               for _ in range(count)]  # fmt: skip
    batch = [image] * images_per_call

    def sender(client: AsyncClient) -> Callable[[], Awaitable[list[int]]]:
        async def send() -> list[int]:
            if images_per_call == 1:
                predictions = [await client.classify(image, top_k=1)]
            else:
                predictions = await client.classify_batch(batch, top_k=1)
            return [p.timings.batch_size for p in predictions]

        return send

    async def close() -> None:
        for client in clients:
            await client.close()

    return [sender(client) for client in clients], close


def _oip_senders(target: str, image, count: int, timeout: float, images_per_call: int, model_name: str):
    """One ModelInfer sender per channel. The request is serialised once and sent as bytes, and the
    answer is not parsed (an error is its status): the generator's work per call is gRPC's alone."""
    payload = _model_infer_request(model_name, image, images_per_call)
    channels = [grpc.aio.insecure_channel(target, options=[_OWN_CONNECTION]) for _ in range(count)]

    def sender(channel: grpc.aio.Channel) -> Callable[[], Awaitable[list[int]]]:
        call = channel.unary_unary(_MODEL_INFER)  # bytes in, bytes out

        async def send() -> list[int]:
            await call(payload, timeout=timeout)
            return []  # no timings in the answer: the mean batch size comes from /metrics

        return send

    async def close() -> None:
        for channel in channels:
            await channel.close()

    return [sender(channel) for channel in channels], close


def _model_infer_request(model_name: str, image: np.ndarray | bytes, count: int) -> bytes:
    from cbam.oip import grpc_service_pb2 as pb  # not imported by the cbam.v1 benchmark

    request = pb.ModelInferRequest(model_name=model_name)
    if isinstance(image, bytes):
        request.inputs.add(name="encoded_images", datatype="BYTES", shape=[count, 1])
        request.raw_input_contents.append((struct.pack("<I", len(image)) + image) * count)
    else:
        batch = np.ascontiguousarray(np.broadcast_to(image, (count, *image.shape)))
        request.inputs.add(name="images", datatype="UINT8", shape=list(batch.shape))
        request.raw_input_contents.append(batch.tobytes())
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 1
    return request.SerializeToString()


def oip_model_name(target: str, timeout: float = 30.0) -> str:
    """The name of the model a server serves over the Open Inference Protocol (its repository index)."""
    from cbam.oip import grpc_service_pb2 as pb
    from cbam.oip import grpc_service_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        index = stub.RepositoryIndex(pb.RepositoryIndexRequest(), timeout=timeout, wait_for_ready=True)
    return index.models[0].name
