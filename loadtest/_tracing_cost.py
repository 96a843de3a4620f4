"""Tracing's cost (cbam-bench --tracing-cost): served throughput with tracing off, on at 100% sampling
(stage spans), and on with stage events, interleaved in one run, optionally against a baseline
checkout (another tree's code, e.g. main before tracing existed) for "off costs nothing".

Every variant's server runs for the whole run, side by side on loopback; the spans go to a local OTLP
sink in a process of its own (loadtest/otlp_sink.py), which takes them and drops them. Round by round,
each variant gets the same load for the same window, in rotated order (A B C, B C A, C A B, ...), so
whatever else the machine does falls on all of them. Judged: the median of the rounds' paired ratios
(on / off; off / baseline), with their spread; a spread wider than the effect measured says so.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from rich.table import Table

from server.launcher import ServerProcess

from ._served import drive_load

__all__ = ["TRACING_TARGETS", "measure_tracing_cost", "tracing_cost_table"]

# What the variants are judged by: throughput with tracing on (100%) at least 95% of off's; off
# within 1% of the baseline's (nothing measurable, on a machine whose rounds agree to 1%).
TRACING_TARGETS = {"on": 0.95, "on, stage events": 0.95, "off": 0.99}


class _Sink:
    """``python -m loadtest.otlp_sink`` in its own process (on ``cpus``, the load generator's, when
    given: a collector runs elsewhere): its endpoint, and what it took at the end."""

    def __init__(self, cpus: set[int] | None) -> None:
        self._process = subprocess.Popen(
            [sys.executable, "-m", "loadtest.otlp_sink"], stdout=subprocess.PIPE, text=True
        )
        if cpus is not None:
            os.sched_setaffinity(self._process.pid, cpus)
        first = self._process.stdout.readline()
        if not first:
            raise RuntimeError("the OTLP sink did not start (is the tracing extra installed?)")
        self.endpoint: str = json.loads(first)["endpoint"]

    def stop(self) -> dict:
        self._process.terminate()
        out, _ = self._process.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def _variants(sink: str, baseline: Path | None) -> dict[str, tuple[list[str], Path | None]]:
    """name -> (cbam-serve flags, checkout to run it from: None for this one)."""
    on = ["--tracing.enabled", "true", "--tracing.endpoint", sink, "--tracing.sample_ratio", "1.0"]
    variants: dict[str, tuple[list[str], Path | None]] = {}
    if baseline is not None:
        variants["baseline"] = ([], baseline)
    variants["off"] = (["--tracing.enabled", "false"], None)
    variants["on"] = (on, None)
    variants["on, stage events"] = ([*on, "--tracing.stage_spans", "false"], None)
    return variants


def measure_tracing_cost(
    payload: np.ndarray | bytes,
    *,
    server_flags: list[str],
    concurrency: int,
    rounds: int,
    seconds: float,
    warmup_seconds: float,
    baseline: Path | None = None,
    client_cpus: set[int] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Throughput and latency of each variant per round, their paired ratios and the targets judged.
    The servers run on this thread's cores; the load generator and the sink on ``client_cpus``."""
    say = progress or (lambda _: None)
    sink = _Sink(client_cpus)
    servers: dict[str, ServerProcess] = {}
    figures: dict[str, list[dict]] = {}
    try:
        for name, (flags, checkout) in _variants(sink.endpoint, baseline).items():
            say(f"starting cbam-serve, tracing {name} ...")
            servers[name] = ServerProcess(*server_flags, *flags, checkout=checkout)
            servers[name].start()
            figures[name] = []
        if client_cpus is not None:
            os.sched_setaffinity(0, client_cpus)
        names = list(servers)
        for round_ in range(rounds):
            order = names[round_ % len(names) :] + names[: round_ % len(names)]
            say(f"round {round_ + 1} of {rounds}: {', '.join(order)}")
            for name in order:
                load = drive_load(
                    servers[name].address,
                    payload,
                    concurrency=concurrency,
                    seconds=seconds,
                    warmup_seconds=warmup_seconds,
                    metrics_url=servers[name].metrics_url,
                )
                figures[name].append(asyncio.run(load).summary())
    finally:
        for server in servers.values():
            server.stop()  # SIGTERM: it drains (and is killed if it takes too long)
            server.kill()  # whatever is left of its process group
        taken = sink.stop()
    return _judge(figures, taken, concurrency, rounds, seconds, baseline)


def _judge(figures: dict[str, list[dict]], taken: dict, concurrency: int, rounds: int, seconds: float,
           baseline: Path | None) -> dict:  # fmt: skip
    by_variant = {
        name: {
            "throughput": statistics.median(r["throughput"] for r in rows),
            "p50_ms": _median(r["p50"] for r in rows),
            "p99_ms": _median(r["p99"] for r in rows),
            "mean_batch_size": _median(r["mean_batch_size"] for r in rows),
            "errors": sum(r["errors"] for r in rows),
            "round_throughputs": [r["throughput"] for r in rows],
        }
        for name, rows in figures.items()
    }
    comparisons = {}
    for name, reference in (("on", "off"), ("on, stage events", "off"), ("off", "baseline")):
        if name not in figures or reference not in figures:
            continue
        pairs = zip(figures[name], figures[reference], strict=True)
        ratios = [a["throughput"] / b["throughput"] for a, b in pairs if b["throughput"] > 0]
        if not ratios:
            continue  # no call finished in the reference's windows: nothing to compare
        median = statistics.median(ratios)
        spread = max(ratios) - min(ratios)
        effect = abs(1 - median)
        comparisons[f"{name} / {reference}"] = {
            "ratio": median,
            "round_ratios": ratios,
            "spread": spread,
            "target": f"throughput >= {TRACING_TARGETS[name]:.2f} x {reference}'s",
            # A verdict only from 3 rounds or more that agree better than the margin being judged.
            "trustworthy": len(ratios) >= 3 and spread <= max(1 - TRACING_TARGETS[name], effect),
            "met": median >= TRACING_TARGETS[name],
        }
    return {
        "concurrency": concurrency,
        "rounds": rounds,
        "seconds_per_window": seconds,
        "baseline_checkout": str(baseline) if baseline else None,
        "sampling": "100% (tracing.sample_ratio 1.0) for the 'on' variants",
        "sink": taken,
        "by_variant": by_variant,
        "comparisons": comparisons,
    }


def _median(values) -> float | None:
    """The median of the values that were measured (a window where no call finished has none)."""
    present = [value for value in values if value is not None]
    return statistics.median(present) if present else None


def _shown(value: float | None, form: str) -> str:
    return "-" if value is None else format(value, form)


def tracing_cost_table(cost: dict) -> Table:
    title = f"Tracing's cost: Classify, concurrency {cost['concurrency']}, {cost['rounds']} rounds"
    table = Table(title=title)
    for column in ("tracing", "images/s", "p50 ms", "p99 ms", "mean batch", "errors", "round images/s"):
        table.add_column(column, justify="right")
    for name, f in cost["by_variant"].items():
        table.add_row(
            name,
            f"{f['throughput']:.1f}",
            _shown(f["p50_ms"], ".2f"),
            _shown(f["p99_ms"], ".2f"),
            _shown(f["mean_batch_size"], ".1f"),
            str(f["errors"]),
            " ".join(f"{t:.0f}" for t in f["round_throughputs"]),
        )
    return table
