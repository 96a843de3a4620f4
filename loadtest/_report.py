"""What cbam-bench reports: the machine, the targets judged, the table and the plot."""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ._ceiling import Ceiling, usable_cores

__all__ = [
    "UNITS",
    "compare_workers",
    "describe_machine",
    "evaluate_targets",
    "plot",
    "print_targets",
    "print_workers_comparison",
    "results_table",
    "verdict",
]

UNITS = {
    "throughput": "images/s",
    "p50": "ms",
    "p95": "ms",
    "p99": "ms",
    "mean_batch_size": "requests per forward",
    "errors": "calls",
    "efficiency": "served throughput / ceiling throughput at mean_batch_size",
    "worker_share": "each worker's fraction of the images answered in the window",
    "server_cores_used": "CPU seconds of every server process (supervisor and workers) per second",
    "server_cpu_ms_per_image": "CPU ms of every server process per image answered",
    "forward_cpu_ms_per_image": "CPU ms of the forward threads (cbam-inference and the threads it started)",
    "outside_forward_cpu_ms_per_image": "server_cpu_ms_per_image - forward_cpu_ms_per_image: gRPC, decoding, "
    "batching, postprocessing; cores to feed R images/s = R * this / 1000",
    "forward_wall_ms_per_image": "forward passes' wall time (inference stage histogram) per image",
}
SATURATION_TARGET = 0.90  # served / ceiling at the same batch size
# Issue 12: a whole batch per ModelInfer leaves no per-image protobuf or Python work to lose to.
OIP_SATURATION_TARGET = 0.95
BATCH1_OVERHEAD_TARGET_MS = 2.0  # served p50 at concurrency 1 minus the raw batch-1 forward
BATCHING_GAIN_TARGET = 1.10  # what we call a clear gain at concurrency 32


def describe_machine() -> dict:
    import torch

    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu or "unknown",
        "cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        # Other work on these cores skews every figure; the load average says how much there was.
        "load_average_1m_at_start": os.getloadavg()[0],
    }


def evaluate_targets(rows: list[dict], ceiling: Ceiling, protocol: str = "cbam") -> dict:
    """The three targets of issue 5, each with its figure and whether it was met (None: not measured);
    over the Open Inference Protocol (``protocol`` "oip") the saturation target is issue 12's."""
    saturation_target = OIP_SATURATION_TARGET if protocol == "oip" else SATURATION_TARGET
    by_setting: dict[str, list[dict]] = {}
    for row in rows:
        by_setting.setdefault(row["setting"], []).append(row)
    default = next((s for s in by_setting if s.endswith("(default)")), next(iter(by_setting), None))
    targets: dict = {}

    saturation = {}
    for setting, setting_rows in by_setting.items():
        measured = [r for r in setting_rows if r["efficiency"] is not None]
        if not measured:
            continue
        best = max(measured, key=lambda r: r["throughput"])
        saturation[setting] = {
            "concurrency": best["concurrency"],
            "throughput": best["throughput"],
            "mean_batch_size": best["mean_batch_size"],
            "efficiency": best["efficiency"],
        }
    targets["saturation_efficiency"] = {
        "target": f">= {saturation_target:.0%} of the ceiling at the same batch size, at each setting's peak",
        "by_setting": saturation,
        "met": all(s["efficiency"] >= saturation_target for s in saturation.values()) if saturation else None,
    }

    single = next((r for r in by_setting.get(default, []) if r["concurrency"] == 1), None)
    if single is not None and single.get("images_per_call", 1) > 1:
        single = None  # a many-image call's latency is not one image's: the target does not apply
    overhead = None if single is None or single["p50"] is None else single["p50"] - ceiling.latency_ms[1]
    targets["batch1_latency_overhead_ms"] = {
        "target": f"served p50 at concurrency 1 <= batch-1 forward + {BATCH1_OVERHEAD_TARGET_MS:g} ms",
        "served_p50_ms": None if single is None else single["p50"],
        "forward_ms": ceiling.latency_ms[1],
        "overhead_ms": overhead,
        "met": None if overhead is None else overhead <= BATCH1_OVERHEAD_TARGET_MS,
    }

    at_32 = {r["max_batch_size"]: r for r in rows if r["concurrency"] == 32}
    gain = None
    if 1 in at_32 and max(at_32) > 1:
        gain = at_32[max(at_32)]["throughput"] / at_32[1]["throughput"]
    targets["batching_gain_at_concurrency_32"] = {
        "target": f"throughput at concurrency 32, batching / max_batch_size 1, >= {BATCHING_GAIN_TARGET}",
        "max_batch_size": max(at_32) if at_32 else None,
        "gain": gain,
        "met": None if gain is None else gain >= BATCHING_GAIN_TARGET,
    }
    return targets


def results_table(rows: list[dict], ceiling: Ceiling) -> Table:
    table = Table(
        title=f"served vs ceiling (batch-1 forward {ceiling.latency_ms[1]:.2f} ms, {ceiling.threads} thr.)",
        caption="batch: max_batch_size (* the server's default); c: concurrent callers; latencies in ms; "
        "cpu ms/img: the server processes' CPU per image, outside fwd: of it outside the forward"
        + (
            f", per call of {rows[0]['images_per_call']} images"
            if rows and rows[0].get("images_per_call", 1) > 1
            else ""
        )
        + "; ceiling: in-process images/s at the mean batch",
    )
    columns = ("batch", "c", "images/s", "p50", "p95", "p99", "mean batch", "errors", "ceiling", "efficiency",
               "cpu ms/img", "outside fwd")  # fmt: skip
    for name in columns:
        table.add_column(name, justify="left" if name == "batch" else "right", no_wrap=True)
    for row in rows:
        table.add_row(
            row["setting"].replace(" (default)", "*"),
            str(row["concurrency"]),
            f"{row['throughput']:.1f}",
            _number(row["p50"], "{:.2f}"),
            _number(row["p95"], "{:.2f}"),
            _number(row["p99"], "{:.2f}"),
            _number(row["mean_batch_size"], "{:.2f}"),
            str(row["errors"]) if not row["errors"] else f"[red]{row['errors']}[/red]",
            _number(row["ceiling_throughput"], "{:.1f}"),
            _number(row["efficiency"], "{:.0%}"),
            _number(row.get("server_cpu_ms_per_image"), "{:.2f}"),
            _number(row.get("outside_forward_cpu_ms_per_image"), "{:.2f}"),
        )
    return table


def compare_workers(rows: list[dict]) -> list[dict]:
    """Throughput of each worker count against the first one's, per batch setting and concurrency, the
    ratio taken within each round (the two servers ran back to back) and its median over rounds."""
    base = rows[0]["workers"] if rows else None
    by_key: dict[tuple, dict[int, float]] = {}
    for row in rows:
        key = (row["max_batch_size"], row["concurrency"], row["round"])
        by_key.setdefault(key, {})[row["workers"]] = row["throughput"]
    comparisons: dict[tuple, list[float]] = {}
    for (batch, c, _), by_workers in by_key.items():
        for workers, throughput in by_workers.items():
            if workers != base and base in by_workers:
                comparisons.setdefault((batch, c, workers), []).append(throughput / by_workers[base])
    return [
        {"max_batch_size": batch, "concurrency": c, "workers": workers, "base_workers": base,
         "ratio": statistics.median(ratios), "round_ratios": ratios}
        for (batch, c, workers), ratios in comparisons.items()
    ]  # fmt: skip


def print_workers_comparison(comparisons: list[dict], console: Console) -> None:
    for c in comparisons:
        rounds = ", ".join(f"{r:.2f}" for r in c["round_ratios"])
        console.print(
            f"max_batch_size {c['max_batch_size']}, concurrency {c['concurrency']}: {c['workers']} workers / "
            f"{c['base_workers']} = {c['ratio']:.2f}x throughput (rounds: {rounds})",
            highlight=False,
        )


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def verdict(met: bool | None) -> str:
    """A target's verdict, in rich markup."""
    return {None: "[dim]not measured[/dim]", True: "[green]met[/green]", False: "[red]not met[/red]"}[met]


def print_targets(targets: dict, console: Console) -> None:
    saturation = targets["saturation_efficiency"]
    figures = ", ".join(
        f"{s}: {v['efficiency']:.0%} at c={v['concurrency']}" for s, v in saturation["by_setting"].items()
    )
    lines = [f"saturation efficiency ({figures}): {verdict(saturation['met'])}"]
    latency = targets["batch1_latency_overhead_ms"]
    if latency["overhead_ms"] is not None:
        lines.append(
            f"concurrency-1 p50 {latency['served_p50_ms']:.2f} ms vs forward {latency['forward_ms']:.2f} ms "
            f"(+{latency['overhead_ms']:.2f} ms): {verdict(latency['met'])}"
        )
    gain = targets["batching_gain_at_concurrency_32"]
    if gain["gain"] is not None:
        lines.append(
            f"batching gain at concurrency 32 (max_batch_size {gain['max_batch_size']} vs 1): "
            f"{gain['gain']:.2f}x: {verdict(gain['met'])}"
        )
    for line in lines:  # figures only: rich's highlighting would colour every number
        console.print(line, highlight=False)


def plot(report: dict, path: Path) -> None:
    """Throughput and p99 against concurrency, one line per setting, the ceiling dashed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    rows = report["results"]
    settings = list(dict.fromkeys(row["setting"] for row in rows))
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    for setting in settings:
        mine = [row for row in rows if row["setting"] == setting]
        x = [row["concurrency"] for row in mine]
        p99 = [float("nan") if row["p99"] is None else row["p99"] for row in mine]
        left.plot(x, [row["throughput"] for row in mine], marker="o", label=f"max_batch_size {setting}")
        right.plot(x, p99, marker="o", label=f"max_batch_size {setting}")
    by_batch = report["ceiling"]["by_batch_size"]
    best = max(by_batch, key=lambda size: by_batch[size]["throughput"])
    left.axhline(
        by_batch[best]["throughput"],
        color="grey",
        linestyle="--",
        label=f"ceiling (in-process, batch {best})",
    )
    if best != "1":
        left.axhline(by_batch["1"]["throughput"], color="grey", linestyle=":", label="ceiling, batch 1")
    for axis, title, unit in ((left, "throughput", "images/s"), (right, "p99 latency", "ms")):
        axis.set_xscale("log", base=2)
        axis.set_xticks(sorted({row["concurrency"] for row in rows}))
        axis.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.set_xlabel("concurrent callers")
        axis.set_ylabel(unit)
        axis.set_title(title)
        axis.grid(True, alpha=0.3)
        axis.legend(fontsize=8)
    right.set_yscale("log")
    machine, model = report["machine"], report["model"]
    fig.suptitle(
        f"cbam-serve {model['arch']} {model['input_size'][0]}x{model['input_size'][1]} on "
        f"{machine['cpu']} ({machine['usable_cores']} cores), torch {machine['torch']}",
        fontsize=9,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
