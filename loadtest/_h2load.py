"""One measuring window of h2load (nghttp2's C load generator) against one gRPC unary method.

h2load sends the same pre-framed request body on every stream, over `concurrency` connections of one
stream each, after a warm-up on the same connections, and logs every request's latency. It speaks HTTP/2
only: it counts HTTP statuses, not gRPC's (an answer with grpc-status UNAVAILABLE is HTTP 200), so the
caller checks the answers another way (their DATA bytes, the server's own counts, real gRPC calls).
It costs a small fraction of a core at these rates, leaving the machine to the servers, and it is the
same generator for every server whatever its protocol.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["H2LOAD", "H2loadWindow", "h2load_window"]

H2LOAD = "h2load"
_STARTED = "Main benchmark duration is started"
_OVER = "Main benchmark duration is over"
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
    r"(\d+) timeout"
)
_DATA = re.compile(r"traffic: .*\((\d+)\) data")


@dataclass
class H2loadWindow:
    """What h2load saw in its main window (the warm-up before it excluded)."""

    seconds: float
    succeeded: int  # HTTP 2xx answers: gRPC answers of any status
    failed: int  # streams that failed, errored or timed out
    data_bytes: int  # response DATA: the framed answer messages (a gRPC error answer has none)
    latencies_ms: list[float] = field(default_factory=list)  # of the 2xx answers
    edges: tuple = (None, None)  # what on_edge returned at the window's start and end


def h2load_window(
    url: str,
    body: Path,
    *,
    concurrency: int,
    seconds: float,
    warmup_seconds: float,
    log_file: Path,
    cpus: str | None = None,
    on_edge: Callable[[int], object] | None = None,
) -> H2loadWindow:
    """Run h2load for warm-up then `seconds`, calling `on_edge(pid)` as the main window starts and ends
    (h2load announces both); `cpus` (e.g. "1" or "0-1") pins it with taskset."""
    if shutil.which(H2LOAD) is None:
        raise RuntimeError(
            "h2load is not installed: apt-get install nghttp2-client (scripts/setup.sh --test)"
        )
    command = [
        *(["taskset", "-c", cpus] if cpus else []),
        H2LOAD,
        f"--clients={concurrency}",
        "--max-concurrent-streams=1",
        "--threads=1",
        f"--duration={round(seconds * 1000)}ms",
        f"--warm-up-time={round(warmup_seconds * 1000)}ms",
        f"--log-file={log_file}",
        f"--data={body}",
        "--header=content-type: application/grpc",
        "--header=te: trailers",
        url,
    ]
    edges = []
    log_file.unlink(missing_ok=True)  # h2load writes none when nothing finished: no stale rows
    with subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True
    ) as process:
        output = []
        for line in process.stdout:  # h2load flushes each line: the edges are seen as they happen
            output.append(line)
            if on_edge is not None and (line.startswith(_STARTED) or line.startswith(_OVER)):
                edges.append(on_edge(process.pid))
        code = process.wait()
    text = "".join(output)
    counts, data = _REQUESTS.search(text), _DATA.search(text)
    if code != 0 or counts is None or data is None or len(edges) not in (0, 2):
        raise RuntimeError(f"h2load failed (exit {code}): {' '.join(command)}\n{text[-2000:]}")
    _, _, _, succeeded, failed, errored, timeout = (int(n) for n in counts.groups())
    return H2loadWindow(
        seconds=seconds,
        succeeded=succeeded,
        failed=failed + errored + timeout,
        data_bytes=int(data.group(1)),
        latencies_ms=_latencies_ms(log_file),
        edges=tuple(edges) if edges else (None, None),
    )


def _latencies_ms(log_file: Path) -> list[float]:
    """The log's rows: start (µs since the epoch), HTTP status (-1: failed), duration (µs)."""
    latencies = []
    if not log_file.exists():
        return latencies
    for row in log_file.read_text().splitlines():
        start, status, micros, *_ = row.split("\t")
        if 200 <= int(status) < 300:
            latencies.append(int(micros) / 1000)
    return latencies
