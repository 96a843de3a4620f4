"""The peer comparison's measurement: start the servers, check their answers, run interleaved rounds of
h2load windows, and account every window's CPU: the server's, h2load's, and everything else's."""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import psutil

from ._h2load import H2loadWindow, h2load_window
from ._peer_servers import Answer, Served
from ._wire import grpc_frame

__all__ = ["SideBySide", "check_answer", "measure_side_by_side"]

ANSWER_TOLERANCE = 0.01  # relative: another runtime or batch shape moves float32 probabilities ~1e-6


@dataclass
class SideBySide:
    servers: dict  # name -> protocol, method, settings, the answers checked before and after
    rows: list[dict]  # one per measured window


def measure_side_by_side(
    servers: Sequence[Served],
    pixels: np.ndarray,
    reference: np.ndarray,
    *,
    workdir: Path,
    concurrency: Sequence[int],
    rounds: int,
    seconds: float,
    warmup_seconds: float,
    first_warmup_seconds: float = 0.0,
    server_cpus: set[int] | None = None,
    client_cpus: set[int] | None = None,
    progress: Callable[[str], None] = print,
) -> SideBySide:
    """Start every server (on `server_cpus`), check its answer, warm each up, run the interleaved rounds
    with h2load (on `client_cpus`), check the answers again, stop them all. `reference` is the model's
    probabilities for `pixels`, computed in this process."""
    generator = _Generator(
        workdir,
        cpus=",".join(map(str, sorted(client_cpus))) if client_cpus else None,
        cores=sorted((server_cpus or os.sched_getaffinity(0)) | (client_cpus or set())),
    )
    checked: dict[str, list[dict]] = {}
    try:
        _start_all(servers, server_cpus, progress)
        for server in servers:
            checked[server.name] = [_verify(server, pixels, reference)]
            (workdir / f"{server.name}.body").write_bytes(grpc_frame(server.request(pixels)))
        for server in servers if first_warmup_seconds > 0 else ():
            progress(f"warming up {server.name} at concurrency {max(concurrency)} ...")
            generator.window(server, max(concurrency), first_warmup_seconds, 0.0)
        rows = []
        for round_ in range(rounds):
            turn = round_ % len(servers)  # each server takes each place in the order in turn
            for c in concurrency:
                for server in [*servers[turn:], *servers[:turn]]:
                    progress(f"round {round_ + 1} of {rounds}, concurrency {c}: {server.name} ...")
                    row = _measure(
                        server, generator, c, seconds, warmup_seconds, checked[server.name][0]["bytes"]
                    )
                    rows.append({"round": round_, **row})
        for server in servers:
            checked[server.name].append(_verify(server, pixels, reference))
        described = {
            server.name: {
                "protocol": server.protocol,
                "method": server.method,
                "settings": server.settings(),
                "answers_checked": checked[server.name],
            }
            for server in servers
        }
    finally:
        _stop_all(servers)
    return SideBySide(described, rows)


def check_answer(answer: Answer, reference: np.ndarray) -> str | None:
    """None when `answer` is a top class of `reference` with its probability; else what is wrong."""
    if not 0 <= answer.index < len(reference):
        return f"class {answer.index} is not one of the model's {len(reference)}"
    expected, best = float(reference[answer.index]), int(np.argmax(reference))
    if expected < float(reference[best]) * (1 - ANSWER_TOLERANCE):
        return (
            f"class {answer.index} (probability {expected:.6g} here) is not the top class {best} "
            f"({reference[best]:.6g})"
        )
    if abs(answer.probability - expected) > ANSWER_TOLERANCE * expected:
        return (
            f"class {answer.index} with probability {answer.probability:.6g}; the model gives {expected:.6g}"
        )
    return None


def _verify(server: Served, pixels: np.ndarray, reference: np.ndarray) -> dict:
    """One real gRPC call with the message h2load sends; the answer must be the model's. Returns it, with
    the framed answer's size (what every successful answer of the load carries)."""
    with grpc.insecure_channel(server.target) as channel:
        try:
            response = channel.unary_unary(server.method)(server.request(pixels), timeout=300)
        except grpc.RpcError as exc:
            raise RuntimeError(
                f"{server.name} refused the request: {exc.code().name}: {exc.details()}"
            ) from None
    answer = server.read_answer(response)
    if (problem := check_answer(answer, reference)) is not None:
        raise RuntimeError(f"{server.name} answered wrongly: {problem}")
    return {"index": answer.index, "probability": answer.probability, "bytes": len(grpc_frame(response))}


@dataclass(frozen=True)
class _Generator:
    """h2load's placement: where it writes, the cores it is pinned to (None: all), the cores watched."""

    workdir: Path
    cpus: str | None
    cores: list[int]

    def window(self, server: Served, concurrency: int, seconds: float, warmup: float, on_edge=None):
        """One h2load run against `server`, then a wait until the server is idle: a peer goes on computing
        the calls h2load dropped at the window's end, which would fall on the next server's window.
        Returns the window and the seconds the server took to go idle."""
        window = h2load_window(
            f"http://{server.target}{server.method}",
            self.workdir / f"{server.name}.body",
            concurrency=concurrency,
            seconds=seconds,
            warmup_seconds=warmup,
            log_file=self.workdir / "h2load.log",
            cpus=self.cpus,
            on_edge=on_edge,
        )
        return window, _wait_idle(server)


@dataclass
class _Snapshot:
    at: float
    busy: float  # CPU seconds on the watched cores, every process
    server: float
    generator: float
    this: float
    answered: float | None

    @classmethod
    def take(cls, server: Served, generator_pid: int, cores: list[int]) -> _Snapshot:
        per_cpu = psutil.cpu_times(percpu=True)
        busy = sum(
            t.user + t.nice + t.system + t.irq + t.softirq + t.steal  # steal: another guest had the core
            for t in (per_cpu[i] for i in cores if i < len(per_cpu))
        )
        generator, this = psutil.Process(generator_pid).cpu_times(), psutil.Process().cpu_times()
        return cls(
            at=time.monotonic(),
            busy=busy,
            server=server.cpu_seconds(),
            generator=generator.user + generator.system,
            this=this.user + this.system,
            answered=server.answered(),
        )


def _measure(
    server: Served, generator: _Generator, concurrency: int, seconds: float, warmup: float, answer_bytes: int
) -> dict:
    """One window: req/s, latencies, errors, the CPU of the server and of everything else, and checks."""
    window, idle_after = generator.window(
        server, concurrency, seconds, warmup, on_edge=lambda pid: _Snapshot.take(server, pid, generator.cores)
    )
    start, end = window.edges
    wall = end.at - start.at
    ours = (end.server - start.server) + (end.generator - start.generator) + (end.this - start.this)
    answered, errors = _answers(window, answer_bytes)
    counted = None if start.answered is None else end.answered - start.answered
    mismatch = None
    # The server's count and h2load's are read at slightly different moments (and some servers refresh
    # their metrics periodically), so only a gross shortfall says h2load counted answers never made.
    if counted is not None and counted < 0.5 * window.succeeded - 2 * concurrency:
        mismatch = f"the server counted {counted:.0f} answers in the window, h2load {window.succeeded}"
    latencies = np.asarray(window.latencies_ms)
    p50, p99 = (float(v) for v in np.percentile(latencies, [50, 99])) if latencies.size else (None, None)
    return {
        "server": server.name,
        "concurrency": concurrency,
        "seconds": seconds,
        "answered": answered,
        "throughput": answered / seconds,
        "p50": p50,
        "p99": p99,
        "errors": errors,
        "server_counted": counted,
        "count_mismatch": mismatch,
        "server_cores": (end.server - start.server) / wall,
        "generator_cores": (end.generator - start.generator) / wall,
        "other_cores": max(0.0, (end.busy - start.busy) - ours) / wall,
        "idle_after_seconds": idle_after,  # how long the server went on working after the window
        "load_average_1m": os.getloadavg()[0],
    }


def _answers(window: H2loadWindow, answer_bytes: int) -> tuple[int, int]:
    """(successful answers, errors). h2load sees HTTP only: a gRPC error is a 200 without a message, while
    every real answer carries about `answer_bytes` of DATA, so a shortfall of bytes is errors."""
    without_message = round(window.succeeded - window.data_bytes / answer_bytes)
    if without_message <= max(1, 0.01 * window.succeeded):  # answers' sizes differ by a few bytes
        without_message = 0
    return window.succeeded - without_message, window.failed + without_message


def _wait_idle(server: Served, busy_cores: float = 0.1, step: float = 0.5, timeout: float = 30.0) -> float:
    """Wait until the server's processes use less than `busy_cores` over `step` seconds (at most
    `timeout`); return the seconds waited."""
    started = time.monotonic()
    before = server.cpu_seconds()
    while time.monotonic() - started < timeout:
        time.sleep(step)
        now = server.cpu_seconds()
        if now - before < busy_cores * step:
            break
        before = now
    return time.monotonic() - started


def _start_all(servers: Sequence[Served], cpus: set[int] | None, progress: Callable[[str], None]) -> None:
    """Start them side by side (each thread pinned first, so its server inherits the cores). If one fails
    to start, or the user interrupts, stop them all (their start loops then see their processes end)."""

    def start(server: Served) -> None:
        if cpus is not None:
            os.sched_setaffinity(0, cpus)  # this thread only: the server started from it inherits it
        progress(f"starting {server.name} ...")
        started = time.monotonic()
        server.start()
        progress(f"{server.name} serving on {server.target} after {time.monotonic() - started:.0f} s")

    pool = concurrent.futures.ThreadPoolExecutor(len(servers))
    starts = [pool.submit(start, server) for server in servers]

    def abandon() -> None:
        _stop_all(servers)
        pool.shutdown(cancel_futures=True)  # waits for the start loops, which end with their processes
        _stop_all(servers)  # any that got as far as starting meanwhile

    try:
        done, _ = concurrent.futures.wait(starts, return_when=concurrent.futures.FIRST_EXCEPTION)
    except BaseException:  # Ctrl-C while they start
        abandon()
        raise
    if failures := [str(f.exception()) for f in done if f.exception() is not None]:
        abandon()
        raise SystemExit("cbam-bench --peers: " + "\n".join(failures))
    pool.shutdown()


def _stop_all(servers: Sequence[Served]) -> None:
    for server in servers:
        try:
            server.stop()
        except Exception as exc:  # keep stopping the others; say which one would not stop
            print(f"cbam-bench --peers: stopping {server.name}: {exc}", file=sys.stderr)
