"""cbam-bench: served throughput and latency of cbam-serve against the in-process ceiling, on this machine.

    cbam-bench [--quick] [--json OUT] [--plot OUT.png] [--target HOST:PORT] [--arch NAME --input-size N]
    cbam-bench --protocol oip --images-per-call 32 [...]   the Open Inference Protocol's ModelInfer instead
    cbam-bench --cbam-cost [--backend B] [--cost-batch-sizes 1,8,32] [--json OUT]
    cbam-bench --tracing-cost [--baseline-checkout DIR] [--concurrency C] [--tracing-rounds N] [--json OUT]
    cbam-bench --peers [--setup] [--quick] [--peer-venvs DIR] [--json OUT]

1. The ceiling: the same model, loaded in this process, timed doing nothing but forward passes at batch
   sizes 1, 2, 4, ... (the server's thread settings, torch.inference_mode).
2. For each batching setting (max_batch_size 1, 8, 32 and the server's default), a fresh server
   (`python -m server --port 0 --metrics-port 0 --batching.max_batch_size N`), or the --target one.
3. For each concurrency (1, 4, 16, 32, 64): that many asyncio tasks sending Classify back to back
   over one channel (uint8 tensors at the model's input size by default), warm-up, then a timed window.
   With --protocol oip, each call is one ModelInfer holding --images-per-call images as one UINT8
   tensor (serialised once; the answer's top class only).

Reported per setting and concurrency: throughput (images/s), p50/p95/p99 latency (ms), mean batch size
(from the server's cbam_batch_size histogram), errors, and efficiency = throughput / ceiling throughput at
that mean batch size. The load generator runs on the same cores as the server, which it slows down.

--cbam-cost measures something else: cbam_resnet50's forward against plain resnet50's, interleaved in
this process, at batch 1 and the best batch (loadtest/_cost.py); nothing is served.

--tracing-cost serves the default model with tracing off, on at 100% sampling (stage spans) and on with
stage events, the spans going to a local OTLP sink, all running at once and loaded in rotated turns
(loadtest/_tracing_cost.py); --baseline-checkout DIR adds a server run from another source tree (main
before tracing, say), to judge what tracing costs while off.

--peers measures cbam-serve, with its defaults, against Triton (PyTriton) and TorchServe serving the same
weights, side by side in one run (loadtest/peers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from client import Client, ModelInfo
from server.backends import AUTO, backend_choices  # names only: no torch
from server.launcher import ServerProcess

from ._ceiling import CeilingMeter, backend_callable, build_model, configure_threads, resolve_backend
from ._cost import cost_table, measure_cbam_cost
from ._report import (
    UNITS,
    compare_workers,
    describe_machine,
    evaluate_targets,
    plot,
    print_targets,
    print_workers_comparison,
    results_table,
    verdict,
)
from ._served import PROTOCOLS, drive_load, oip_model_name

__all__ = ["main"]

FULL = {
    "concurrency": "1,4,16,32,64",
    "batch_sizes": "default,1,8,32",
    "duration": 5.0,
    "warmup": 1.0,
    "ceiling_seconds": 0.5,  # per batch size and round; a round runs before each server and at the end
}
QUICK = {
    "concurrency": "1,16",
    "batch_sizes": "default,1",
    "duration": 1.5,
    "warmup": 0.5,
    "ceiling_seconds": 0.1,
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--peers" in argv:  # a different run with its own options: loadtest/peers.py
        from .peers import main as peers_main

        return peers_main([arg for arg in argv if arg != "--peers"])
    parser = _parser()
    args = parser.parse_args(argv)
    preset = QUICK if args.quick else FULL
    if args.quick and args.arch:
        parser.error("--quick benchmarks the default model only; drop --quick to benchmark --arch")
    if args.images_per_call < 1:
        parser.error("--images-per-call should be >= 1")
    if args.rounds < 1 or (args.channels is not None and args.channels < 1):
        parser.error("--rounds and --channels should be >= 1")
    if args.target and args.workers:
        parser.error("--workers starts servers; a --target runs with its own workers")
    if args.tracing_cost and (args.quick or args.target or args.cbam_cost):
        parser.error("--tracing-cost starts its own servers; drop --quick, --target and --cbam-cost")
    if args.cbam_cost and (args.quick or args.target or args.arch):
        parser.error("--cbam-cost times cbam_resnet50 against resnet50 in this process; drop --quick, "
                     "--target and --arch")  # fmt: skip
    try:
        concurrency = _int_list(args.concurrency or preset["concurrency"], "--concurrency")
        settings = _settings(args.batch_sizes or preset["batch_sizes"])
        workers_list: list[int | None] = _int_list(args.workers, "--workers") if args.workers else [None]
    except ValueError as exc:
        parser.error(str(exc))
    if args.target:
        settings = [None]  # whatever the running server does
    duration = args.duration if args.duration is not None else preset["duration"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    console = Console(stderr=True)
    try:
        server_cpus, client_cpus = _cpu_sets(args)
    except ValueError as exc:
        parser.error(str(exc))
    # Before any torch work: the ceiling's threads (and the servers started from here) get the
    # server's cores, so the ceiling runs with the thread count the server will have.
    _pin(server_cpus)
    from server.assembly import batch_buckets  # the server's batch sizes and allocator
    from server.tuning import configure_malloc

    configure_malloc()
    configure_threads()  # before describing the machine, so it reports the threads the ceiling uses
    machine = describe_machine()
    if args.cbam_cost:
        return _cbam_cost(args, machine, console)
    if args.tracing_cost:
        return _tracing_cost(args, machine, console, client_cpus)

    model, input_size, version = build_model(args.arch, args.input_size)
    num_parameters = sum(p.numel() for p in model.parameters())
    explicit = [size for size in settings if size is not None]
    ceiling_seconds = args.ceiling_seconds if args.ceiling_seconds is not None else preset["ceiling_seconds"]
    ceiling_sizes = set(batch_buckets(max([*explicit, 32]))) | set(explicit)
    args.backend = resolve_backend(args.backend, input_size)  # auto: what the server tries first here
    runnable = backend_callable(model, args.backend, input_size)
    meter = CeilingMeter(runnable, input_size, ceiling_sizes, ceiling_seconds)
    console.print(f"ceiling round: {args.arch or 'default model'} in-process ...", highlight=False)
    meter.round()

    image = np.random.default_rng(0).integers(0, 256, (*input_size, 3), dtype=np.uint8)
    payload = image if args.payload == "tensor" else _png(image)
    rows: list[dict] = []
    runs = [(workers, setting) for workers in workers_list for setting in settings]
    measured: set[tuple[int | None, int | None, int]] = set()
    for round_ in range(1, args.rounds + 1):
        # A, B, then B, A: whatever else the machine does drifts over both alike.
        for workers, setting in runs if round_ % 2 else runs[::-1]:
            if setting is not None and (workers, setting, round_) in measured:
                continue  # the default turned out to be this size, already measured
            flags = [] if setting is None else ["--batching.max_batch_size", str(setting)]
            flags = (["--arch", args.arch] if args.arch else []) + flags
            flags += [] if workers is None else ["--workers", str(workers)]
            flags += ["--model.backend", args.backend, *args.server_arg]
            server = None if args.target else ServerProcess(*flags)
            if server is not None:
                console.print(f"starting cbam-serve {' '.join(flags)} ...", highlight=False)
                server.start()  # inherits this thread's cores: the server's
            _pin(client_cpus)  # the load generator (and gRPC threads it starts) on the client's cores
            try:
                load = {"payload": payload, "seconds": duration, "warmup_seconds": warmup}
                served = _served_rows(args, server, setting is None, input_size, concurrency, load, console)
            finally:
                if server is not None:
                    server.stop()  # SIGTERM: it drains (and is killed if it takes too long)
                    server.kill()  # whatever is left of its process group: a supervisor's workers too
                _pin(server_cpus)
            for row in served:
                measured.add((workers, row["max_batch_size"], round_))
                if args.workers:
                    row["setting"] = f"{row['workers']}w {row['setting']}"
                rows.append({**row, "round": round_})
            console.print("ceiling round ...", highlight=False)
            meter.round()  # while no server runs

    ceiling = meter.result()
    for row in rows:
        batch = row["mean_batch_size"]
        row["ceiling_throughput"] = None if batch is None else ceiling.throughput_at(batch)
        row["efficiency"] = None if batch is None else row["throughput"] / row["ceiling_throughput"]

    # The targets are judged on the first workers setting's first round; the others are compared to it.
    judged = [row for row in rows if row["round"] == 1 and row["workers"] == rows[0]["workers"]]
    if args.protocol == "oip":
        tensor = "BYTES [N, 1] of PNG" if args.payload == "png" else "UINT8 [N, H, W, 3]"
        generator = (f"grpc.aio, ModelInfer of {args.images_per_call} images as one {tensor} tensor "
                     "(serialised once), classification=1")  # fmt: skip
    else:
        call = "Classify" if args.images_per_call == 1 else f"ClassifyBatch of {args.images_per_call} images"
        generator = f"client.AsyncClient, {call}, top_k=1"
    report = {
        "machine": machine,
        "model": {
            "arch": args.arch or "default checkpoint",
            "version": version,
            "input_size": list(input_size),
            "num_parameters": num_parameters,
            "backend": args.backend,
        },
        "load": {
            "payload": f"uint8 tensor {input_size[0]}x{input_size[1]}x3 (random pixels)"
            if args.payload == "tensor"
            else f"PNG of random pixels, {input_size[0]}x{input_size[1]}",
            "generator": f"{generator}, no retries, tasks back to back, in the benchmark's own process",
            "protocol": args.protocol,
            "images_per_call": args.images_per_call,
            "channels": args.channels or "1 to a single process, else 8 per worker (at most 1 per caller)",
            "duration_seconds": duration,
            "warmup_seconds": warmup,
            "target": args.target or "a fresh cbam-serve per setting on 127.0.0.1",
        },
        "units": UNITS,
        "ceiling": ceiling.as_dict(),
        "results": rows,
        "targets": evaluate_targets(judged, ceiling, protocol=args.protocol),
        "workers_comparison": compare_workers(rows),
    }
    report["machine"]["load_average_1m_at_end"] = os.getloadavg()[0]
    Console(width=max(Console().width, 130)).print(results_table(rows, ceiling))
    print_targets(report["targets"], console)
    print_workers_comparison(report["workers_comparison"], console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}", highlight=False)
    if args.plot:
        plot(report, args.plot)
        console.print(f"wrote {args.plot}", highlight=False)
    return 1 if any(row["errors"] for row in rows) else 0


def _served_rows(
    args: argparse.Namespace,
    server: ServerProcess | None,
    default_batching: bool,
    input_size: tuple[int, int],
    concurrency: list[int],
    load: dict,
    console: Console,
) -> list[dict]:
    """One server (``server``, or the --target one) at every concurrency: a row each. ``load``: the
    payload, seconds and warmup_seconds of drive_load."""
    if server is None:
        target, metrics_url, pids = args.target, args.metrics_url, []
    else:
        target, metrics_url = server.address, server.metrics_url
    info = _check_served(target, args.arch, input_size)
    model_name = oip_model_name(target) if args.protocol == "oip" else ""
    workers = max(1, len(info.workers))
    if server is not None:  # a --target's CPU counters are not read: its pids may be another machine's
        pids = list(dict.fromkeys([server.pid, *(w.pid for w in info.workers if w.pid)]))
    label = f"{info.batching.max_batch_size}" + (" (default)" if default_batching and server else "")
    rows = []
    for c in concurrency:
        # One connection reaches one worker: several workers need several connections to share the load.
        channels = args.channels or min(c, 1 if workers == 1 else 8 * workers)
        console.print(f"  max_batch_size {label}, {workers} worker(s), concurrency {c} ...", highlight=False)
        result = drive_load(
            target,
            load["payload"],
            concurrency=c,
            seconds=load["seconds"],
            warmup_seconds=load["warmup_seconds"],
            channels=channels,
            metrics_url=metrics_url,
            images_per_call=args.images_per_call,
            server_pids=pids,
            protocol=args.protocol,
            model_name=model_name,
        )
        rows.append({
            "setting": label,
            "max_batch_size": info.batching.max_batch_size,
            "max_batch_delay_ms": info.batching.max_batch_delay_ms,
            "workers": workers,
            "channels": channels,
            "torch_threads": None if server is None else server.serving.get("torch_threads"),
            **asyncio.run(result).summary(),
            "load_average_1m": os.getloadavg()[0],
        })  # fmt: skip
    return rows


def _cbam_cost(args: argparse.Namespace, machine: dict, console: Console) -> int:
    """--cbam-cost: cbam_resnet50 against resnet50 in this process, nothing served."""
    try:
        sizes = _int_list(args.cost_batch_sizes, "--cost-batch-sizes")
    except ValueError as exc:
        raise SystemExit(f"cbam-bench: {exc}") from None
    args.backend = resolve_backend(args.backend, (224, 224))
    cost = measure_cbam_cost(
        args.backend,
        sizes,
        rounds=args.cost_rounds,
        progress=lambda step: console.print(f"CBAM's cost, {args.backend}: {step} ...", highlight=False),
    )
    Console(width=max(Console().width, 100)).print(cost_table(cost))
    console.print(f"{cost['target']}: {verdict(cost['met'])}", highlight=False)
    _write_json(args.json, machine, "cbam_cost", cost, console)
    return 0


def _write_json(path: Path | None, machine: dict, key: str, figures: dict, console: Console) -> None:
    """--json of a measurement that is not the served table: the machine, and ``figures`` as ``key``."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    machine["load_average_1m_at_end"] = os.getloadavg()[0]
    path.write_text(json.dumps({"machine": machine, key: figures}, indent=2) + "\n")
    console.print(f"wrote {path}", highlight=False)


def _tracing_cost(
    args: argparse.Namespace, machine: dict, console: Console, client_cpus: set[int] | None
) -> int:
    """--tracing-cost: tracing off, on, on with stage events (and a baseline checkout), interleaved."""
    from ._ceiling import build_model
    from ._tracing_cost import measure_tracing_cost, tracing_cost_table

    try:
        (concurrency,) = _int_list(args.concurrency or "16", "--concurrency")
    except ValueError as exc:
        raise SystemExit(f"cbam-bench: --tracing-cost takes one --concurrency: {exc}") from None
    _, input_size, _ = build_model(args.arch, args.input_size)
    image = np.random.default_rng(0).integers(0, 256, (*input_size, 3), dtype=np.uint8)
    payload = image if args.payload == "tensor" else _png(image)
    args.backend = resolve_backend(args.backend, input_size)  # by name: a baseline checkout may predate auto
    flags = (["--arch", args.arch] if args.arch else []) + ["--model.backend", args.backend, *args.server_arg]
    cost = measure_tracing_cost(
        payload,
        server_flags=flags,
        concurrency=concurrency,
        rounds=args.tracing_rounds,
        seconds=args.duration if args.duration is not None else FULL["duration"],
        warmup_seconds=args.warmup if args.warmup is not None else FULL["warmup"],
        baseline=args.baseline_checkout,
        client_cpus=client_cpus,
        progress=lambda step: console.print(step, highlight=False),
    )
    Console(width=max(Console().width, 100)).print(tracing_cost_table(cost))
    for name, c in cost["comparisons"].items():
        spread = " ".join(f"{r:.3f}" for r in c["round_ratios"])
        judged = verdict(c["met"]) if c["trustworthy"] else "[yellow]too few rounds, or apart[/yellow]"
        console.print(f"{name}: {c['ratio']:.3f} (rounds {spread}); {c['target']}: {judged}", highlight=False)
    _write_json(args.json, machine, "tracing_cost", cost, console)
    errors = sum(f["errors"] for f in cost["by_variant"].values())
    return 1 if errors else 0


def doc_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the docstring's first paragraph and whose epilog is the rest after
    the usage paragraph."""
    return argparse.ArgumentParser(
        prog=prog,
        description=doc.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(doc.split("\n\n")[2:]),
    )


def _parser() -> argparse.ArgumentParser:
    parser = doc_parser("cbam-bench", __doc__)
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
        "--ceiling-seconds",
        type=float,
        metavar="S",
        help="time per batch size and round of the ceiling (default 0.5)",
    )
    parser.add_argument(
        "--channels",
        type=int,
        help="gRPC connections the callers share (default: 1 to a single-process server, 8 per worker to "
        "one with workers, at most one per caller): one connection reaches one worker",
    )
    parser.add_argument(
        "--workers",
        metavar="LIST",
        help="start servers with each of these worker counts (e.g. 1,2), one after the other, and compare "
        "their throughput (default: the server's own)",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        metavar="N",
        help="repeat every server N times, in A,B then B,A order, for the spread of the comparisons "
        "(default 1)",
    )
    parser.add_argument(
        "--images-per-call",
        type=int,
        default=1,
        metavar="N",
        help="send N images per ClassifyBatch call instead of one per Classify call, or per ModelInfer "
        "with --protocol oip (default 1); throughput still counts images, latencies are per call",
    )
    parser.add_argument(
        "--protocol",
        choices=PROTOCOLS,
        default="cbam",
        help="cbam: cbam.v1 Classify (ClassifyBatch with --images-per-call); oip: the Open Inference "
        "Protocol's ModelInfer, --images-per-call images as one tensor per call (default cbam)",
    )
    parser.add_argument(
        "--payload",
        choices=("tensor", "png"),
        default="tensor",
        help="send uint8 tensors (default) or PNG files",
    )
    parser.add_argument(
        "--backend",
        choices=backend_choices(),
        default=AUTO,
        help="model.backend of the servers, and what the ceiling runs (default auto: the one the server "
        "tries first on this machine, named in the report)",
    )
    _add_cpu_options(
        parser,
        server="cores (e.g. 0 or 0-1) for the ceiling and the servers; torch threads follow (default: all)",
        client="cores for the load generator (default: all)",
    )
    parser.add_argument(
        "--cbam-cost",
        action="store_true",
        help="instead: time cbam_resnet50 against resnet50 (224x224, --backend), interleaved in this "
        "process, and judge CBAM's cost (forward <= 1.10x at batch 1 and at the best batch)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="instead: cbam-serve with its defaults against Triton and TorchServe, side by side "
        "(loadtest/peers.py; its options: cbam-bench --peers --help)",
    )
    parser.add_argument(
        "--cost-batch-sizes", default="1,8,32", metavar="LIST", help="with --cbam-cost (default 1,8,32)"
    )
    parser.add_argument(
        "--cost-rounds", type=int, default=5, metavar="N", help="with --cbam-cost: A/B rounds (default 5)"
    )
    parser.add_argument(
        "--tracing-cost",
        action="store_true",
        help="instead: serve with tracing off, on (100%% sampling, to a local OTLP sink) and on with stage "
        "events, interleaved, and judge tracing's cost on throughput (on >= 0.95 x off)",
    )
    parser.add_argument(
        "--tracing-rounds", type=int, default=6, metavar="N", help="with --tracing-cost: rounds (default 6)"
    )
    parser.add_argument(
        "--baseline-checkout",
        type=Path,
        metavar="DIR",
        help="with --tracing-cost: also serve from this source tree (e.g. a worktree of main), to judge "
        "tracing off against it (off >= 0.99 x baseline)",
    )
    parser.add_argument(
        "--server-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="one more cbam-serve argument (repeat it: --server-arg=--batching.max_batch_delay_ms "
        "--server-arg=0)",
    )
    return parser


def _add_cpu_options(parser: argparse.ArgumentParser, *, server: str, client: str) -> None:
    """--server-cpus and --client-cpus (read back by _cpu_sets), with these helps."""
    parser.add_argument("--server-cpus", metavar="LIST", help=server)
    parser.add_argument("--client-cpus", metavar="LIST", help=client)


def _cpu_sets(args: argparse.Namespace) -> tuple[set[int] | None, set[int] | None]:
    """The cores of --server-cpus and --client-cpus; raises ValueError naming a bad flag."""
    return _cpu_set(args.server_cpus, "--server-cpus"), _cpu_set(args.client_cpus, "--client-cpus")


def _cpu_set(text: str | None, flag: str) -> set[int] | None:
    """'0,2-3' -> {0, 2, 3}; None stays None (every core this process may use)."""
    if not text:
        return None
    cpus: set[int] = set()
    try:
        for part in text.split(","):
            low, _, high = part.partition("-")
            cpus.update(range(int(low), int(high or low) + 1))
    except ValueError:
        raise ValueError(f"{flag} should list cores like 0 or 0-1,3, got {text!r}") from None
    allowed = os.sched_getaffinity(0)
    if not cpus <= allowed:
        raise ValueError(f"{flag} {text!r} names cores outside this process's {sorted(allowed)}")
    return cpus


def _pin(cpus: set[int] | None) -> None:
    """Run this thread, and the threads and processes it starts from now on, on ``cpus``."""
    if cpus is not None:
        os.sched_setaffinity(0, cpus)


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


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def _check_served(target: str, arch: str | None, input_size: tuple[int, int]) -> ModelInfo:
    """What is served (batching, workers), after checking the server serves what the ceiling measured."""
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
    return info


if __name__ == "__main__":
    sys.exit(main())
