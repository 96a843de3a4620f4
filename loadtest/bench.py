"""cbam-bench: served throughput and latency of cbam-serve against the in-process ceiling, on this machine.

    cbam-bench [--quick] [--json OUT] [--plot OUT.png] [--target HOST:PORT] [--arch NAME --input-size N]

1. The ceiling: the same model, loaded in this process, timed doing nothing but forward passes at batch
   sizes 1, 2, 4, ... (the server's thread settings, torch.inference_mode).
2. For each batching setting (max_batch_size 1, 8, 32 and the server's default), a fresh server
   (`python -m server --port 0 --metrics-port 0 --batching.max_batch_size N`), or the --target one.
3. For each concurrency (1, 4, 16, 32, 64): that many asyncio tasks sending Classify back to back
   over one channel (uint8 tensors at the model's input size by default), warm-up, then a timed window.

Reported per setting and concurrency: throughput (images/s), p50/p95/p99 latency (ms), mean batch size
(from the server's cbam_batch_size histogram), errors, and efficiency = throughput / ceiling throughput at
that mean batch size. The load generator runs on the same cores as the server, which it slows down.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import json
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from client import Client

from ._ceiling import Ceiling, build_model, measure_ceiling, usable_cores
from ._served import LaunchedServer, drive_load

__all__ = ["main"]

FULL = {
    "concurrency": "1,4,16,32,64",
    "batch_sizes": "default,1,8,32",
    "duration": 5.0,
    "warmup": 1.0,
    "ceiling_seconds": 1.5,
}
QUICK = {
    "concurrency": "1,16",
    "batch_sizes": "default,1",
    "duration": 1.5,
    "warmup": 0.5,
    "ceiling_seconds": 0.3,
}
UNITS = {
    "throughput": "images/s",
    "p50": "ms",
    "p95": "ms",
    "p99": "ms",
    "mean_batch_size": "requests per forward",
    "errors": "calls",
    "efficiency": "served throughput / ceiling throughput at mean_batch_size",
}
SATURATION_TARGET = 0.90  # served / ceiling at the same batch size
BATCH1_OVERHEAD_TARGET_MS = 2.0  # served p50 at concurrency 1 minus the raw batch-1 forward
BATCHING_GAIN_TARGET = 1.10  # what we call a clear gain at concurrency 32


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.quick and args.arch:
        parser.error("--quick benchmarks the default model only; drop --quick to benchmark --arch")
    try:
        concurrency = _int_list(args.concurrency or preset["concurrency"], "--concurrency")
        settings = _settings(args.batch_sizes or preset["batch_sizes"])
    except ValueError as exc:
        parser.error(str(exc))
    if args.target:
        settings = [None]  # whatever the running server does
    duration = args.duration if args.duration is not None else preset["duration"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    console = Console(stderr=True)
    machine = describe_machine()

    console.print(f"[bold]ceiling[/bold]: {args.arch or 'default model'} in-process ...", highlight=False)
    model, input_size, version = build_model(args.arch, args.input_size)
    explicit = [size for size in settings if size is not None]
    ceiling_sizes = _powers_of_two(max(explicit + [32])) | set(explicit)
    ceiling_seconds = args.ceiling_seconds if args.ceiling_seconds is not None else preset["ceiling_seconds"]
    ceiling = measure_ceiling(model, input_size, ceiling_sizes, ceiling_seconds)
    num_parameters = sum(p.numel() for p in model.parameters())
    del model
    gc.collect()

    image = np.random.default_rng(0).integers(0, 256, (*input_size, 3), dtype=np.uint8)
    payload = image if args.payload == "tensor" else _png(image)
    rows: list[dict] = []
    measured: set[int] = set()
    server_args = ["--arch", args.arch] if args.arch else []
    for setting in settings:
        if setting is not None and setting in measured:
            continue  # the default turned out to be this size, already measured
        flags = [] if setting is None else ["--batching.max_batch_size", str(setting)]
        if args.target:
            server = None
            target, metrics_url = args.target, args.metrics_url
        else:
            server = LaunchedServer(server_args + flags)
            console.print(f"starting cbam-serve {' '.join(server_args + flags)} ...", highlight=False)
            server.start()
            target, metrics_url = server.target, server.metrics_url
        try:
            max_batch_size = _check_served(target, args.arch, input_size)
            measured.add(max_batch_size)
            label = f"{max_batch_size}" + (" (default)" if setting is None and not args.target else "")
            for c in concurrency:
                console.print(f"  max_batch_size {label}, concurrency {c} ...", highlight=False)
                result = asyncio.run(
                    drive_load(
                        target,
                        payload,
                        concurrency=c,
                        seconds=duration,
                        warmup_seconds=warmup,
                        channels=args.channels,
                        metrics_url=metrics_url,
                    )
                )
                row = {"setting": label, "max_batch_size": max_batch_size, **result.summary()}
                batch = row["mean_batch_size"]
                row["ceiling_throughput"] = None if batch is None else ceiling.throughput_at(batch)
                row["efficiency"] = None if batch is None else row["throughput"] / row["ceiling_throughput"]
                rows.append(row)
        finally:
            if server is not None:
                server.stop()

    report = {
        "machine": machine,
        "model": {
            "arch": args.arch or "default checkpoint",
            "version": version,
            "input_size": list(input_size),
            "num_parameters": num_parameters,
        },
        "load": {
            "payload": f"uint8 tensor {input_size[0]}x{input_size[1]}x3 (random pixels)"
            if args.payload == "tensor"
            else f"PNG of random pixels, {input_size[0]}x{input_size[1]}",
            "generator": "client.AsyncClient, Classify, top_k=1, no retries, tasks back to back, in the "
            "benchmark's own process on the same cores as the server",
            "channels": args.channels,
            "duration_seconds": duration,
            "warmup_seconds": warmup,
            "target": args.target or "a fresh cbam-serve per setting on 127.0.0.1",
        },
        "units": UNITS,
        "ceiling": ceiling.as_dict(),
        "results": rows,
        "targets": evaluate_targets(rows, ceiling),
    }
    report["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    Console(width=max(Console().width, 100)).print(_table(rows, ceiling))
    _print_targets(report["targets"], console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}", highlight=False)
    return 1 if any(row["errors"] for row in rows) else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cbam-bench",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[2:]),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="default model, max_batch_size 1 and default, concurrency 1 and 16, short windows "
        "(about half a minute)",
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument(
        "--plot", type=Path, metavar="OUT.png", help="plot throughput and p99 against concurrency"
    )
    parser.add_argument(
        "--target",
        metavar="HOST:PORT",
        help="benchmark this running server (one setting: its own) instead of starting servers",
    )
    parser.add_argument(
        "--metrics-url", metavar="URL", help="with --target: its /metrics, for the mean batch size"
    )
    parser.add_argument(
        "--arch",
        metavar="NAME",
        help="a registered architecture with random weights (cbam-serve --arch), e.g. cbam_resnet50",
    )
    parser.add_argument(
        "--input-size",
        type=int,
        metavar="N",
        help="input height and width; must be what the server serves (the architecture's own)",
    )
    parser.add_argument(
        "--concurrency", metavar="LIST", help=f"comma-separated (default {FULL['concurrency']})"
    )
    parser.add_argument(
        "--batch-sizes",
        metavar="LIST",
        help=f"max_batch_size settings, 'default' for the server's own (default {FULL['batch_sizes']})",
    )
    parser.add_argument(
        "--duration", type=float, metavar="S", help="measuring window per point, seconds (default 5)"
    )
    parser.add_argument(
        "--warmup", type=float, metavar="S", help="warm-up before each window, seconds (default 1)"
    )
    parser.add_argument(
        "--ceiling-seconds", type=float, metavar="S", help="time per batch size on the ceiling (default 1.5)"
    )
    parser.add_argument("--channels", type=int, default=1, help="gRPC channels the tasks share (default 1)")
    parser.add_argument(
        "--payload",
        choices=("tensor", "png"),
        default="tensor",
        help="send uint8 tensors (default) or PNG files",
    )
    return parser


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ValueError(f"{flag} should be comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise ValueError(f"{flag} should list integers >= 1, got {text!r}")
    return values


def _settings(text: str) -> list[int | None]:
    """max_batch_size settings; None stands for the server's default."""
    settings: list[int | None] = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        settings += [None] if part == "default" else _int_list(part, "--batch-sizes")
    if not settings:
        raise ValueError(f"--batch-sizes should list sizes or 'default', got {text!r}")
    return settings


def _powers_of_two(limit: int) -> set[int]:
    return {2**i for i in range(limit.bit_length()) if 2**i <= limit}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_served(target: str, arch: str | None, input_size: tuple[int, int]) -> int:
    """The served max_batch_size, after checking the server serves what the ceiling measured."""
    with Client(target, timeout=30) as client:
        info = client.model_info()
    if arch is not None and info.arch != arch:
        raise SystemExit(f"cbam-bench: the server serves {info.arch!r}, not --arch {arch!r}")
    if tuple(info.input_size) != tuple(input_size):
        raise SystemExit(
            f"cbam-bench: the server serves {info.input_size[0]}x{info.input_size[1]} inputs, the ceiling "
            f"was measured at {input_size[0]}x{input_size[1]}; cbam-serve has no input-size setting, so "
            "--input-size must be the architecture's own"
        )
    return info.batching.max_batch_size


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


def evaluate_targets(rows: list[dict], ceiling: Ceiling) -> dict:
    """The three targets of issue 5, each with its figure and whether it was met (None: not measured)."""
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
        "target": f">= {SATURATION_TARGET:.0%} of the ceiling at the same batch size, at each setting's peak",
        "by_setting": saturation,
        "met": all(s["efficiency"] >= SATURATION_TARGET for s in saturation.values()) if saturation else None,
    }

    single = next((r for r in by_setting.get(default, []) if r["concurrency"] == 1), None)
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


def _table(rows: list[dict], ceiling: Ceiling) -> Table:
    table = Table(
        title=f"served vs ceiling (batch-1 forward {ceiling.latency_ms[1]:.2f} ms, {ceiling.threads} thr.)",
        caption="batch: max_batch_size (* the server's default); c: concurrent callers; latencies in ms; "
        "ceiling: in-process images/s at the mean batch",
    )
    columns = ("batch", "c", "images/s", "p50", "p95", "p99", "mean batch", "errors", "ceiling", "efficiency")
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
        )
    return table


def _number(value: float | None, form: str) -> str:
    return "-" if value is None else form.format(value)


def _print_targets(targets: dict, console: Console) -> None:
    def verdict(met: bool | None) -> str:
        return (
            "[dim]not measured[/dim]"
            if met is None
            else "[green]met[/green]"
            if met
            else "[red]not met[/red]"
        )

    saturation = targets["saturation_efficiency"]
    figures = ", ".join(
        f"{s}: {v['efficiency']:.0%} at c={v['concurrency']}" for s, v in saturation["by_setting"].items()
    )
    console.print(f"saturation efficiency ({figures}): {verdict(saturation['met'])}", highlight=False)
    latency = targets["batch1_latency_overhead_ms"]
    if latency["overhead_ms"] is not None:
        console.print(
            f"concurrency-1 p50 {latency['served_p50_ms']:.2f} ms vs forward {latency['forward_ms']:.2f} ms "
            f"(+{latency['overhead_ms']:.2f} ms): {verdict(latency['met'])}",
            highlight=False,
        )
    gain = targets["batching_gain_at_concurrency_32"]
    if gain["gain"] is not None:
        console.print(
            f"batching gain at concurrency 32 (max_batch_size {gain['max_batch_size']} vs 1): "
            f"{gain['gain']:.2f}x: {verdict(gain['met'])}",
            highlight=False,
        )


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


if __name__ == "__main__":
    sys.exit(main())
