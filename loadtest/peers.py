"""cbam-bench --peers: cbam-serve with its defaults against Triton (PyTriton) and TorchServe, side by side.

    cbam-bench --peers --setup [--peer-venvs DIR]     the peers' venvs, from the package index (once)
    cbam-bench --peers [--quick] [--peer-venvs DIR] [--json OUT] [--server-cpus 0-1 --client-cpus 1]

1. One model and one set of weights: cbam_resnet50 (1000 classes, 224x224, seed-0 random weights), saved
   once as a safetensors checkpoint that every server loads. cbam-serve gets `--checkpoint FILE` and its
   loopback ports, nothing else; the peers run our model code with their batching settings stated.
2. One input: the same uint8 224x224x3 pixels, sent to each server in its own gRPC protocol (cbam.v1
   Classify; the Open Inference Protocol's ModelInfer; TorchServe's Predictions), each server's answer
   being the image's top-1 class and probability.
3. One load generator: h2load, one connection per concurrent caller, the same pre-framed request on every
   call. Before and after the rounds, a real gRPC call with the same bytes to each server checks its
   answer against the model run in this process; in every window, the answers' bytes and the server's own
   count check that h2load's "succeeded" were gRPC successes.
4. Interleaved rounds: each round runs every concurrency against every server in turn (the order rotating
   by round), warm-up then a measured window, so the machine's drift falls on all of them. Reported: req/s
   (median, range, spread), p50/p99, the CPU each server used and what everything else used, and
   cbam-serve's req/s over each peer's, paired by round, against issue 13's targets.

A run whose rounds differ too much, or during which other processes used the cores, says so and gives no
verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from ._h2load import H2LOAD
from ._peer_report import describe_judgement, judge, peer_table, ratios, summarise, trust
from ._peer_servers import CbamServe, PyTriton, Served, TorchServe, copy_models_package
from ._report import describe_machine
from ._side_by_side import measure_side_by_side
from .bench import _add_cpu_options, _cpu_sets, _int_list, doc_parser

__all__ = ["main", "reference_probabilities"]

ARCH = "cbam_resnet50"
SERVERS = ("cbam-serve", "triton", "torchserve")
DEFAULT_VENVS = Path.home() / ".cache" / "cbam-serve" / "peers"
TORCH = "torch==2.13.0"  # the CPU wheel, as scripts/setup.sh installs it; installed first
# safetensors and numpy: our models package and launchers need them. TorchServe installs neither; its
# worker also needs PyYAML, which it does not install either.
PEER_PACKAGES = {
    "triton": ("pytriton", ["nvidia-pytriton==0.7.0", "safetensors>=0.4", "numpy>=1.24"]),
    "torchserve": (
        "torchserve",
        [
            "torchserve==0.12.0",
            "torch-model-archiver==0.12.0",
            "pyyaml>=6",
            "safetensors>=0.4",
            "numpy>=1.24",
        ],
    ),
}
# A batching server answers in bursts of a batch: at concurrency 32 a window holds about ten of them, so
# shorter windows spread from round to round by a batch more than by the server.
FULL = {"rounds": 5, "duration": 10.0, "warmup": 2.0, "first_warmup": 10.0, "concurrency": "1,32"}
QUICK = {"rounds": 2, "duration": 3.0, "warmup": 1.0, "first_warmup": 2.0, "concurrency": "1,32"}


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    console = Console(stderr=True)
    if args.setup:
        return _setup(args.peer_venvs, console)
    preset = QUICK if args.quick else FULL
    names = [name.strip() for name in args.servers.split(",") if name.strip()]
    try:
        concurrency = _int_list(args.concurrency or preset["concurrency"], "--concurrency")
        server_cpus, client_cpus = _cpu_sets(args)
        problems = _preflight(names, args.peer_venvs)
    except ValueError as exc:
        parser.error(str(exc))
    rounds = args.rounds if args.rounds is not None else preset["rounds"]
    duration = args.duration if args.duration is not None else preset["duration"]
    warmup = args.warmup if args.warmup is not None else preset["warmup"]
    if rounds < 1 or duration <= 0 or warmup < 0:
        problems.append(f"--rounds should be >= 1, --duration > 0 and --warmup >= 0, got {rounds}, "
                        f"{duration:g} and {warmup:g}")  # fmt: skip
    if problems:
        parser.error("; ".join(problems))

    machine = describe_machine()
    began = time.monotonic()

    def progress(text: str) -> None:
        console.print(f"[{time.monotonic() - began:5.0f} s] {text}", highlight=False)

    with tempfile.TemporaryDirectory(prefix="cbam-peers-") as tmp:
        workdir = Path(tmp)
        progress(f"weights: {ARCH}, seed 0, saved once ...")
        checkpoint, pixels, reference = _weights_and_input(workdir)
        servers = _servers(names, args, checkpoint, workdir)
        run = measure_side_by_side(
            servers,
            pixels,
            reference,
            workdir=workdir,
            concurrency=concurrency,
            rounds=rounds,
            seconds=duration,
            warmup_seconds=warmup,
            first_warmup_seconds=preset["first_warmup"],
            server_cpus=server_cpus,
            client_cpus=client_cpus,
            progress=progress,
        )
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()

    summary = summarise(run.rows)
    ratio_rows = ratios(run.rows)
    reasons = trust(run.rows, summary, rounds)
    if args.quick:
        reasons.insert(0, "--quick: a smoke run")
    judged = judge(ratio_rows, reasons)
    machine["load_average_1m_at_end"] = os.getloadavg()[0]
    report = {
        "machine": machine,
        "model": {
            "arch": ARCH,
            "num_classes": 1000,
            "input_size": list(pixels.shape[:2]),
            "weights": "seed-0 random initialisation, saved once with models.save_checkpoint",
            "checkpoint_sha256": digest,
        },
        "load": {
            "generator": f"{_h2load_version()}: one connection per concurrent caller, one stream each, "
            "the same pre-framed request on every call",
            "payload": f"uint8 {pixels.shape[0]}x{pixels.shape[1]}x3 pixels (seed 0), one image per request",
            "concurrency": concurrency,
            "rounds": rounds,
            "duration_seconds": duration,
            "warmup_seconds": warmup,
            "first_warmup_seconds": preset["first_warmup"],
            "server_cpus": sorted(server_cpus) if server_cpus else "all",
            "client_cpus": sorted(client_cpus) if client_cpus else "all",
        },
        "servers": run.servers,
        "rows": run.rows,
        "summary": summary,
        "ratios": ratio_rows,
        "untrusted": reasons,
        "targets": judged,
    }
    _print_report(report, console)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}", highlight=False)
    return 1 if any(entry["errors"] for entry in summary) else 0


def _weights_and_input(workdir: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """The checkpoint every server loads, the pixels every request carries, and the model's probabilities
    for them that every answer is checked against."""
    import torch

    from models import CheckpointMetadata, create_model, save_checkpoint

    torch.manual_seed(0)
    model = create_model(ARCH, num_classes=1000).eval()
    meta = CheckpointMetadata(
        arch=ARCH,
        num_classes=1000,
        labels=[f"class {i}" for i in range(1000)],
        input_size=model.input_size,
        version="peers-seed0",
    )
    checkpoint = workdir / f"{ARCH}.safetensors"
    save_checkpoint(model, checkpoint, meta)
    pixels = np.random.default_rng(0).integers(0, 256, (*meta.input_size, 3), dtype=np.uint8)
    return checkpoint, pixels, reference_probabilities(model, meta, pixels)


def reference_probabilities(model, meta, pixels: np.ndarray) -> np.ndarray:
    """The class probabilities of `model` (eager, float32, in this process) for uint8 H x W x 3 `pixels`,
    normalised as the checkpoint's metadata says."""
    import torch

    x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255.0
    x = (x - torch.tensor(meta.mean).view(1, 3, 1, 1)) / torch.tensor(meta.std).view(1, 3, 1, 1)
    with torch.inference_mode():
        return model(x).softmax(dim=1)[0].numpy()


def _servers(names: list[str], args: argparse.Namespace, checkpoint: Path, workdir: Path) -> list[Served]:
    pylib = copy_models_package(workdir / "pylib")
    built: list[Served] = []
    for name in names:
        if name == "cbam-serve":
            built.append(CbamServe(checkpoint, startup_timeout=args.startup_timeout))
        elif name == "triton":
            built.append(
                PyTriton(
                    _venv(args.peer_venvs, name), checkpoint, pylib, workdir / "triton",
                    max_batch_size=args.peer_max_batch_size, max_queue_delay_ms=args.peer_max_delay_ms,
                    startup_timeout=args.startup_timeout,
                )
            )  # fmt: skip
        else:
            built.append(
                TorchServe(
                    _venv(args.peer_venvs, name), checkpoint, pylib, workdir / "torchserve",
                    batch_size=args.peer_max_batch_size, max_batch_delay_ms=round(args.peer_max_delay_ms),
                    startup_timeout=args.startup_timeout,
                )
            )  # fmt: skip
    return built


def _venv(root: Path, server: str) -> Path:
    return root / PEER_PACKAGES[server][0]


def _preflight(names: list[str], venvs: Path) -> list[str]:
    """What is missing for a run, each with how to get it."""
    problems = []
    if unknown := sorted(set(names) - set(SERVERS)):
        problems.append(f"--servers: unknown {unknown}; choose from {list(SERVERS)}")
    if "cbam-serve" not in names:
        problems.append("--servers must include cbam-serve: every figure is a ratio to it")
    if shutil.which(H2LOAD) is None:
        problems.append("h2load is not installed (apt-get install nghttp2-client)")
    for name in set(names) & set(PEER_PACKAGES):
        python = _venv(venvs, name) / "bin" / "python"
        if not python.exists():
            problems.append(
                f"no {name} venv at {python.parent.parent} (create it: cbam-bench --peers --setup "
                f"--peer-venvs {venvs}, or point --peer-venvs at a folder holding pytriton/ and torchserve/)"
            )
    if "torchserve" in names and shutil.which("java") is None:
        problems.append("TorchServe needs Java 17 (apt-get install openjdk-17-jre-headless)")
    return problems


def _setup(root: Path, console: Console) -> int:
    """Each peer's venv from the package index: torch (the CPU wheel) first, then the peer, pinned."""
    for name, (folder, packages) in PEER_PACKAGES.items():
        venv = root / folder
        console.print(f"{name}: {venv} <- {TORCH}, {', '.join(packages)}", highlight=False)
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        pip = [str(venv / "bin" / "pip"), "install", "--quiet", "--disable-pip-version-check"]
        subprocess.run([*pip, TORCH], check=True)
        subprocess.run([*pip, *packages], check=True)
    missing = [tool for tool in (H2LOAD, "java") if shutil.which(tool) is None]
    if missing:
        console.print(f"also needed, from apt: {missing} (nghttp2-client, openjdk-17-jre-headless)")
    return 0


def _h2load_version() -> str:
    try:
        return subprocess.run(
            [H2LOAD, "--version"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except OSError:
        return H2LOAD


def _print_report(report: dict, console: Console) -> None:
    machine = report["machine"]
    title = (
        f"{report['model']['arch']}, one image per request: cbam-serve (defaults) vs peers, "
        f"{report['load']['rounds']} interleaved rounds, {machine['usable_cores']} cores"
    )
    Console(width=max(Console().width, 110)).print(peer_table(report["summary"], title))
    for item in report["targets"]:
        console.print(describe_judgement(item), highlight=False)
    if report["untrusted"]:
        console.print("[yellow]not to be trusted, so no verdict:[/yellow]", highlight=False)
        for reason in report["untrusted"]:
            console.print(f"  - {reason}", highlight=False)


def _parser() -> argparse.ArgumentParser:
    parser = doc_parser("cbam-bench --peers", __doc__)
    parser.add_argument(
        "--setup", action="store_true", help="create the peers' venvs under --peer-venvs from PyPI, then stop"
    )
    parser.add_argument(
        "--peer-venvs",
        type=Path,
        default=DEFAULT_VENVS,
        metavar="DIR",
        help=f"the folder holding the peers' venvs pytriton/ and torchserve/ (default {DEFAULT_VENVS})",
    )
    parser.add_argument(
        "--servers",
        default=",".join(SERVERS),
        metavar="LIST",
        help=f"which to run (default {','.join(SERVERS)})",
    )
    parser.add_argument(
        "--quick", action="store_true", help="a smoke run: 2 rounds of 3 s windows (about 2 to 3 minutes)"
    )
    parser.add_argument("--json", type=Path, metavar="OUT", help="write every figure to this JSON file")
    parser.add_argument(
        "--rounds", type=int, metavar="N", help=f"interleaved rounds (default {FULL['rounds']})"
    )
    parser.add_argument(
        "--duration", type=float, metavar="S", help=f"measured window, seconds (default {FULL['duration']:g})"
    )
    parser.add_argument(
        "--warmup", type=float, metavar="S", help=f"warm-up before each window (default {FULL['warmup']:g})"
    )
    parser.add_argument(
        "--concurrency",
        metavar="LIST",
        help=f"concurrent callers, comma-separated (default {FULL['concurrency']})",
    )
    _add_cpu_options(
        parser,
        server="cores for every server, e.g. 0-1 (default: all; the same for all)",
        client="cores for h2load, e.g. 1 (default: all)",
    )
    parser.add_argument(
        "--peer-max-batch-size",
        type=int,
        default=8,
        metavar="N",
        help="the peers' batch size: Triton's max_batch_size, TorchServe's batchSize (default 8)",
    )
    parser.add_argument(
        "--peer-max-delay-ms",
        type=float,
        default=10.0,
        metavar="MS",
        help="the peers' batching delay: Triton's max_queue_delay, TorchServe's maxBatchDelay (default 10)",
    )
    parser.add_argument(
        "--startup-timeout",
        type=float,
        default=900.0,
        metavar="S",
        help="longest wait for a server to serve (default 900: a backend may build its model at start)",
    )
    return parser


if __name__ == "__main__":
    sys.exit(main())
