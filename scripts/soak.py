"""Soak cbam-serve under steady load and report what drifts: memory, errors and latency.

    python scripts/soak.py --minutes 10                     # starts its own server (default model)
    python scripts/soak.py --minutes 5 -- --arch cbam_resnet8_cifar --model.num_classes 10
    python scripts/soak.py --minutes 30 --target 10.0.0.5:50051 --pid 4242   # a running server

Load is open-loop at --rate operations a second, spread over --concurrency workers (when the server
falls behind, the workers stay busy and the rate drops rather than the queue growing without bound).
An operation is one of: a plain Classify (70 %), a Classify asking for every attention map as PNG
(10 %), a ClassifyStream of 4 images (10 %), or a request with a broken image (10 %), which must be
answered INVALID_ARGUMENT. Any other outcome counts as an error.

After --warmup-seconds the server's resident memory (RSS, from /proc; Linux only) is sampled every
second. The report gives RSS growth (end minus the first sample after warm-up, and the least-squares
slope), the error count, and latency percentiles of the first and last windows (a fifth of the run,
at most a minute each) with the drift between their medians. The exit status is 0 when all three are
within --max-rss-growth-mb, --max-errors and --max-latency-drift, 1 when one is not, 2 when the
server could not be started or reached. --json FILE also writes the report as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "proto")]

import grpc  # noqa: E402
import numpy as np  # noqa: E402
from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: E402
from PIL import Image  # noqa: E402

from cbam.v1 import inference_pb2 as pb  # noqa: E402
from cbam.v1 import inference_pb2_grpc  # noqa: E402
from server.launcher import ServerExited, ServerProcess  # noqa: E402

CALL_TIMEOUT_S = 30.0
STREAM_ITEMS = 4
_MIX = (("classify", 0.7), ("attention", 0.1), ("stream", 0.1), ("invalid", 0.1))


@dataclass
class Tally:
    ok: int = 0
    rejected_as_expected: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    # (time since the measured period began, seconds) of each successful unary call or stream item
    latencies: list[tuple[float, float]] = field(default_factory=list)
    first_errors: list[str] = field(default_factory=list)

    def error(self, what: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if len(self.first_errors) < 10:
            self.first_errors.append(what)


@dataclass(frozen=True)
class Window:
    start_s: float
    end_s: float
    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float


# -- the server ---------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc (Linux)."""
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# -- the load ------------------------------------------------------------------------------------------


def sample_images(info: pb.ModelInfo) -> list[bytes]:
    """The default model's sample images when present, else a few synthetic pictures of several sizes."""
    try:
        from models import SAMPLES_DIR

        files = sorted(SAMPLES_DIR.glob("*.png"))[:16]
    except Exception:  # models not importable, or no samples shipped: synthesise
        files = []
    if files:
        return [f.read_bytes() for f in files]
    rng = np.random.default_rng(0)
    images = []
    h, w = max(int(info.input_height), 8), max(int(info.input_width), 8)
    for i, (fmt, scale) in enumerate([("PNG", 1), ("JPEG", 2), ("PNG", 4), ("JPEG", 1)] * 2):
        pixels = rng.integers(0, 256, (h * scale, w * scale + i, 3), dtype=np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, fmt)
        images.append(buf.getvalue())
    return images


class Load:
    def __init__(self, stub, images: list[bytes], blocks: list[str], rate: float, seed: int = 0) -> None:
        self._stub = stub
        self._images = images
        self._blocks = blocks
        self._interval = 1.0 / rate
        self._random = random.Random(seed)
        self._next_slot = 0.0
        self.tally = Tally()
        self.started = 0.0
        self.measuring_from = 0.0
        self.sent = 0

    async def run(self, workers: int, until: float, measure_from: float) -> None:
        self.started = self._next_slot = time.monotonic()
        self.measuring_from = measure_from
        await asyncio.gather(*(self._worker(until) for _ in range(workers)))

    async def _worker(self, until: float) -> None:
        while True:
            slot = self._next_slot
            self._next_slot += self._interval
            if slot >= until:
                return
            delay = slot - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._one(self._pick())

    def _pick(self) -> str:
        r, acc = self._random.random(), 0.0
        for name, weight in _MIX:
            acc += weight
            if r < acc:
                return name
        return _MIX[-1][0]

    def _request(self, attention: bool = False) -> pb.ClassifyRequest:
        request = pb.ClassifyRequest(encoded=self._random.choice(self._images), top_k=3)
        if attention:
            request.attention.kind = pb.ATTENTION_KIND_BOTH
            request.attention.format = pb.ATTENTION_FORMAT_PNG
        return request

    def _record_ok(self, began: float) -> None:
        now = time.monotonic()
        if now >= self.measuring_from:
            self.tally.latencies.append((now - self.measuring_from, now - began))
        self.tally.ok += 1

    async def _one(self, kind: str) -> None:
        began = time.monotonic()
        try:
            if kind == "stream":
                await self._stream(began)
                return
            self.sent += 1
            if kind == "invalid":
                bad = pb.ClassifyRequest(encoded=self._random.randbytes(256))
                try:
                    await self._stub.Classify(bad, timeout=CALL_TIMEOUT_S)
                    self.tally.error("broken image answered OK")
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.INVALID_ARGUMENT:
                        self.tally.rejected_as_expected += 1
                    else:
                        self.tally.error(f"broken image: {exc.code().name}: {exc.details()}")
                return
            response = await self._stub.Classify(self._request(kind == "attention"), timeout=CALL_TIMEOUT_S)
            if len(response.labels) != 3 or (kind == "attention" and not response.attention):
                self.tally.error("malformed response")
            else:
                self._record_ok(began)
        except grpc.aio.AioRpcError as exc:
            self.tally.error(f"{kind}: {exc.code().name}: {exc.details()}")

    async def _stream(self, began: float) -> None:
        requests = [self._request() for _ in range(STREAM_ITEMS)]
        for i, request in enumerate(requests):
            request.request_id = f"item-{i}"
        self.sent += len(requests)
        seen = set()
        async for answer in self._stub.ClassifyStream(iter(requests), timeout=CALL_TIMEOUT_S):
            if answer.WhichOneof("outcome") == "response":
                seen.add(answer.request_id)
                self._record_ok(began)
            else:
                self.tally.error(f"stream item: code {answer.error.code}: {answer.error.message}")
                seen.add(answer.request_id)
        for missing in {r.request_id for r in requests} - seen:
            self.tally.error(f"stream item {missing} never answered")


# -- the report ----------------------------------------------------------------------------------------


def _percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def window(latencies: list[tuple[float, float]], start: float, end: float) -> Window:
    values = [lat for t, lat in latencies if start <= t < end]
    return Window(start, end, len(values), *(1000 * _percentile(values, q) for q in (50, 95, 99)))


def slope_per_minute(samples: list[tuple[float, int]]) -> float:
    """Least-squares slope of RSS over time, in MB a minute."""
    if len(samples) < 2:
        return 0.0
    t = np.array([s[0] for s in samples])
    y = np.array([s[1] for s in samples]) / 2**20
    return float(np.polyfit(t, y, 1)[0] * 60)


def report(args, load: Load, rss: list[tuple[float, int]], measured_s: float, exit_code: int | None) -> dict:
    span = min(60.0, measured_s / 5)
    first = window(load.tally.latencies, 0.0, span)
    last = window(load.tally.latencies, measured_s - span, measured_s + 1)
    drift = (last.p50_ms / first.p50_ms - 1) if first.count and last.count else float("nan")
    rss_start = rss[0][1] if rss else 0
    rss_end = rss[-1][1] if rss else 0
    growth_mb = (rss_end - rss_start) / 2**20
    errors = sum(load.tally.errors.values())
    checks = {
        "rss_growth": growth_mb <= args.max_rss_growth_mb,
        "errors": errors <= args.max_errors,
        "latency_drift": not (drift > args.max_latency_drift),  # NaN (no samples) is not a failure here
        "server_exit": exit_code in (0, None) if args.target is None else True,
    }
    return {
        "seconds": round(measured_s + args.warmup_seconds, 1),
        "warmup_seconds": args.warmup_seconds,
        "target_rate": args.rate,
        "concurrency": args.concurrency,
        "sent": load.sent,
        "ok": load.tally.ok,
        "rejected_as_expected": load.tally.rejected_as_expected,
        "errors": errors,
        "errors_by_kind": load.tally.errors,
        "first_errors": load.tally.first_errors,
        "throughput_per_s": round(load.sent / max(measured_s + args.warmup_seconds, 1e-9), 1),
        "rss_start_mb": round(rss_start / 2**20, 1),
        "rss_end_mb": round(rss_end / 2**20, 1),
        "rss_max_mb": round(max((r for _, r in rss), default=0) / 2**20, 1),
        "rss_growth_mb": round(growth_mb, 1),
        "rss_slope_mb_per_min": round(slope_per_minute(rss), 2),
        "latency_first": asdict(first),
        "latency_last": asdict(last),
        "latency_p50_drift": round(drift, 3),
        "server_exit_code": exit_code,
        "checks": checks,
        "passed": all(checks.values()),
    }


def print_report(r: dict) -> None:
    f, la = r["latency_first"], r["latency_last"]
    print(f"soak: {r['seconds']} s ({r['warmup_seconds']} s warm-up) at {r['target_rate']} ops/s target, "
          f"{r['concurrency']} workers")  # fmt: skip
    print(f"requests: {r['sent']} sent, {r['ok']} ok, {r['rejected_as_expected']} rejected as expected "
          f"(INVALID_ARGUMENT), {r['errors']} errors; {r['throughput_per_s']} req/s")  # fmt: skip
    for what in r["first_errors"]:
        print(f"  error: {what}")
    print(f"rss: {r['rss_start_mb']} MB after warm-up -> {r['rss_end_mb']} MB at end "
          f"({r['rss_growth_mb']:+} MB; max {r['rss_max_mb']} MB; "
          f"slope {r['rss_slope_mb_per_min']:+} MB/min)")  # fmt: skip

    def percentiles(w: dict) -> str:
        return f"{w['p50_ms']:.1f}/{w['p95_ms']:.1f}/{w['p99_ms']:.1f} ({w['count']} calls)"

    print(f"latency p50/p95/p99 ms: first {f['end_s'] - f['start_s']:.0f} s {percentiles(f)}, "
          f"last {percentiles(la)}; p50 drift {r['latency_p50_drift']:+.0%}")  # fmt: skip
    if r["server_exit_code"] is not None:
        print(f"server exit code after SIGTERM: {r['server_exit_code']}")
    failed = [name for name, ok in r["checks"].items() if not ok]
    print("verdict: " + ("PASS" if r["passed"] else f"FAIL ({', '.join(failed)})"))


async def soak(args, address: str, pid: int | None) -> tuple[Load, list[tuple[float, int]], float]:
    options = [("grpc.max_receive_message_length", -1)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        status = await health.Check(health_pb2.HealthCheckRequest(), timeout=10, wait_for_ready=True)
        if status.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(status.status)
            raise RuntimeError(f"server at {address} is {name}")
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        info = await stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
        load = Load(stub, sample_images(info), list(info.attention_blocks), args.rate, args.seed)
        total_s = args.minutes * 60 if args.seconds is None else args.seconds
        begin = time.monotonic()
        measure_from = begin + args.warmup_seconds
        rss: list[tuple[float, int]] = []

        async def sample() -> None:
            while True:
                now = time.monotonic()
                if pid is not None and now >= measure_from:
                    with contextlib.suppress(OSError):
                        rss.append((now - measure_from, rss_bytes(pid)))
                await asyncio.sleep(1.0)

        sampler = asyncio.create_task(sample())
        try:
            await load.run(args.concurrency, begin + total_s, measure_from)
        finally:
            sampler.cancel()
        if pid is not None:
            with contextlib.suppress(OSError):
                rss.append((time.monotonic() - measure_from, rss_bytes(pid)))
        return load, rss, max(time.monotonic() - measure_from, 0.0)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="soak.py", description=__doc__.split("\n\n")[0],
        epilog="Arguments after -- go to `python -m server` (when no --target).",
    )  # fmt: skip
    duration = parser.add_mutually_exclusive_group()
    duration.add_argument("--minutes", type=float, default=5.0, help="how long to run (default 5)")
    duration.add_argument("--seconds", type=float, help="how long to run, in seconds")
    parser.add_argument("--rate", type=float, default=40.0, help="operations a second (default 40)")
    parser.add_argument("--concurrency", type=int, default=8, help="workers: most calls at once (default 8)")
    parser.add_argument("--warmup-seconds", type=float, default=None,
                        help="left out of RSS and latency figures (default: a tenth of the run, 5..60 s)")
    parser.add_argument("--target", help="HOST:PORT of a running server (default: start one)")
    parser.add_argument("--pid", type=int, help="its process id, for RSS (with --target)")
    parser.add_argument("--max-rss-growth-mb", type=float, default=64.0, help="(default 64)")
    parser.add_argument("--max-errors", type=int, default=0, help="(default 0)")
    parser.add_argument("--max-latency-drift", type=float, default=1.0,
                        help="most p50 growth, last window over first, as a fraction (default 1.0 = +100 %%)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the report here")
    argv = sys.argv[1:] if argv is None else argv
    server_args: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, server_args = argv[:at], argv[at + 1 :]
    args = parser.parse_args(argv)
    args.server_args = server_args
    total_s = args.minutes * 60 if args.seconds is None else args.seconds
    if total_s <= 0 or args.rate <= 0 or args.concurrency < 1:
        parser.error("duration, --rate and --concurrency must be positive")
    if args.warmup_seconds is None:
        args.warmup_seconds = min(max(total_s / 10, 5.0), 60.0, total_s / 2)
    if args.pid is not None and args.target is None:
        parser.error("--pid goes with --target")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    server = None
    address, pid = args.target, args.pid
    if address is None:
        server = ServerProcess("--metrics.enabled", "false", *args.server_args)
        try:
            server.start()
        except (ServerExited, TimeoutError) as exc:
            print(f"soak: {exc}", file=sys.stderr)
            return 2
        address, pid = server.address, server.pid
    exit_code = None
    try:
        load, rss, measured_s = asyncio.run(soak(args, address, pid))
    except (grpc.RpcError, RuntimeError) as exc:
        print(f"soak: cannot load {address}: {exc}", file=sys.stderr)
        return 2
    finally:
        if server is not None:
            exit_code = server.stop(timeout=60)  # SIGTERM: it drains, or is killed (exit code -9)
            server.kill()
    result = report(args, load, rss, measured_s, exit_code)
    if server is not None and not result["passed"]:
        fd, log_path = tempfile.mkstemp(prefix="soak-server-", suffix=".log")
        with os.fdopen(fd, "w") as log:
            log.write(server.output)
        result["server_log"] = log_path
        print(f"server log: {log_path}")
    print_report(result)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
