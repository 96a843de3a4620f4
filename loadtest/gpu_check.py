"""The GPU check: cbam-serve's GPU path verified and measured in one command, into one JSON report.

    bash scripts/gpu_check.sh --wheels .whl --out DIR    on a machine with CUDA (docs/PERFORMANCE.md)
    bash scripts/gpu_check.sh --dry-run --out DIR         the same steps on this CPU, with tiny counts

Steps, each recorded with its time and, when it fails, its message; a failed step does not stop the
next, and the exit status is then 1:
1. environment: device, driver, torch, CUDA, cuDNN, the packages in use and where they come from, and
   whether the generated stubs import;
2. tests: pytest tests/cuda -m cuda --require-cuda (no CUDA means failures, not skips);
3. in-process, per model and dtype: the ceiling at each batch size (the bare forward on a float batch
   already on the device, and the server's own batch path, ModelRunner.run_batch, from uint8 pixels),
   and the cost of attention maps (run_batch with every block's maps against without);
4. served, per model, dtype and backend: cbam-serve started on the device (time to SERVING),
   throughput and p50/p99 at each concurrency from load generators in several processes, served over
   the uint8 ceiling at the same mean batch size, and the CUDA memory of the server from its gauges;
5. the targets of issue 16, judged on those figures.
Asked for CUDA where there is none, it stops at once with exit status 2, and the report says why.
The report is rewritten after every step, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
import traceback
import urllib.request
import xml.etree.ElementTree as ElementTree
from collections.abc import Iterator, Sequence
from importlib import import_module, metadata
from importlib.util import find_spec
from pathlib import Path

# No torch at import: the load-generator processes spawned from here import this module again.
from ._processes import LoadProcesses
from ._served import LaunchedServer

__all__ = ["main", "run_cuda_tests"]

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILE = "gpu_check.json"
TESTS_FILE = "cuda_tests.xml"
EXIT_FAILED = 1
EXIT_NO_CUDA = 2
SATURATION_TARGET = 0.90  # served / in-process ceiling with uint8 input, at the best concurrency
BATCH1_OVERHEAD_TARGET_MS = 1.0  # served p50 at concurrency 1 minus the bare batch-1 forward
CUDA_GAUGES = ("cbam_cuda_memory_allocated_bytes", "cbam_cuda_memory_reserved_bytes")
# import name -> distribution: what the report lists, with version and where it was imported from
PACKAGES = {
    "torch": "torch",
    "grpc": "grpcio",
    "google.protobuf": "protobuf",
    "grpc_health": "grpcio-health-checking",
    "grpc_reflection": "grpcio-reflection",
    "pydantic": "pydantic",
    "pydantic_core": "pydantic-core",
    "pydantic_settings": "pydantic-settings",
    "prometheus_client": "prometheus-client",
    "numpy": "numpy",
    "PIL": "pillow",
    "safetensors": "safetensors",
    "yaml": "PyYAML",
    "onnx": "onnx",
    "onnxscript": "onnxscript",
    "onnxruntime": "onnxruntime",
    "pytest": "pytest",
    "pytest_asyncio": "pytest-asyncio",
}


@dataclasses.dataclass(frozen=True)
class Plan:
    """What one run measures. The first dtype is the target's; `arch` is served with --arch."""

    device: str
    arch: str
    dtypes: tuple[str, ...]
    default_model_every_dtype: bool  # False: the default model in the target dtype only
    backends: tuple[str, ...]
    concurrency: tuple[int, ...]
    ceiling_sizes: tuple[int, ...]
    attention_sizes: tuple[int, ...]
    extra_max_batch_sizes: tuple[int, ...]  # more max_batch_size settings for the target case
    duration: float  # measuring window per load point, seconds
    warmup: float
    ceiling_seconds: float  # per batch size and round
    load_processes: int
    tests_timeout: float
    budget_seconds: float  # the whole run; steps that no longer fit are skipped, and say so


GPU = Plan(
    device="cuda",
    arch="cbam_resnet50",
    dtypes=("float16", "bfloat16", "float32"),
    default_model_every_dtype=True,
    backends=("eager", "onnxruntime", "compile"),
    concurrency=(1, 32, 128),
    ceiling_sizes=(1, 2, 4, 8, 16, 32, 64, 128),
    attention_sizes=(1, 32),
    extra_max_batch_sizes=(128,),
    duration=1.5,
    warmup=0.5,
    ceiling_seconds=0.15,
    load_processes=4,
    tests_timeout=150.0,
    budget_seconds=285.0,
)
# The CPU: float16 needs CUDA, compile takes minutes here, and a small --arch stands in for ResNet-50.
DRY_RUN = dataclasses.replace(
    GPU,
    device="cpu",
    arch="cbam_resnet8_cifar",
    dtypes=("float32", "bfloat16"),
    default_model_every_dtype=False,
    backends=("eager", "onnxruntime"),
    concurrency=(1, 4),
    ceiling_sizes=(1, 2),
    attention_sizes=(1, 2),
    extra_max_batch_sizes=(),
    duration=0.4,
    warmup=0.2,
    ceiling_seconds=0.05,
    load_processes=2,
    tests_timeout=120.0,
    budget_seconds=240.0,
)


@dataclasses.dataclass(frozen=True)
class Case:
    """One served configuration: a model (None: the default checkpoint), dtype, backend, batching."""

    arch: str | None
    dtype: str
    backend: str = "eager"
    max_batch_size: int | None = None  # None: the server's default

    @property
    def model(self) -> str:
        return self.arch or "default"

    @property
    def name(self) -> str:
        batching = "" if self.max_batch_size is None else f" max_batch_size {self.max_batch_size}"
        return f"{self.model} {self.dtype} {self.backend}{batching}"

    def flags(self, device: str) -> list[str]:
        flags = ["--model.device", device, "--model.dtype", self.dtype, "--model.backend", self.backend]
        flags += [] if self.arch is None else ["--arch", self.arch]
        flags += (
            [] if self.max_batch_size is None else ["--batching.max_batch_size", str(self.max_batch_size)]
        )
        return flags


def served_cases(plan: Plan) -> list[Case]:
    """The served configurations, most important first (a run short of time drops the last)."""
    target = plan.dtypes[0]
    cases: list[Case] = []
    if "eager" in plan.backends:
        cases.append(Case(plan.arch, target))
        cases += [Case(plan.arch, target, max_batch_size=size) for size in plan.extra_max_batch_sizes]
        cases += [Case(plan.arch, dtype) for dtype in plan.dtypes[1:]]
        cases += [Case(None, dtype) for dtype in _default_model_dtypes(plan)]
    if "onnxruntime" in plan.backends:
        cases.append(Case(plan.arch, "float32", "onnxruntime"))  # it runs the exported float32 graph
    if "compile" in plan.backends:
        cases.append(Case(plan.arch, target, "compile"))  # last: a bucket takes long to compile
    return cases


def _default_model_dtypes(plan: Plan) -> tuple[str, ...]:
    return plan.dtypes if plan.default_model_every_dtype else plan.dtypes[:1]


class Report:
    """The one JSON report, written again after every step."""

    def __init__(self, path: Path, plan: Plan, mode: str) -> None:
        self.path = path
        self.data: dict = {
            "check": "cbam-serve GPU check (issue 16)",
            "mode": mode,
            "ok": None,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "seconds": None,
            "plan": dataclasses.asdict(plan),
            "environment": {},
            "steps": [],
            "tests": None,
            "ceilings": [],
            "attention": [],
            "served": [],
            "targets": {},
            "failures": [],
        }
        self._started = time.monotonic()

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict]:
        """Run one step: its record says ok or failed (with the message); its exception goes no further."""
        record: dict = {"name": name, "status": "ok", "seconds": None}
        self.data["steps"].append(record)
        _say(f"{name} ...")
        started = time.monotonic()
        try:
            yield record
        except Exception as exc:
            message = f"{type(exc).__name__}: {exc}"[:6000]
            record.update(status="failed", error=message)
            record["where"] = "".join(traceback.format_tb(exc.__traceback__)[-3:])[-3000:]
            self.data["failures"].append({"step": name, "message": message})
            _say(f"{name}: FAILED: {message.splitlines()[0]}")
        finally:
            record["seconds"] = round(time.monotonic() - started, 3)
            self.save()

    def skip(self, name: str, reason: str) -> None:
        self.data["steps"].append({"name": name, "status": "skipped", "reason": reason})
        _say(f"{name}: skipped: {reason}")
        self.save()

    def finish(self) -> bool:
        self.data["ok"] = not self.data["failures"]
        self.data["seconds"] = round(time.monotonic() - self._started, 1)
        self.data["finished"] = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        self.save()
        return self.data["ok"]

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        partial.replace(self.path)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        plan = _plan(args)
    except ValueError as exc:
        parser.error(str(exc))
    out = args.out.resolve()
    report = Report(out / REPORT_FILE, plan, "dry-run (CPU, tiny counts)" if args.dry_run else "gpu")
    deadline = time.monotonic() + plan.budget_seconds

    with report.step("environment"):
        report.data["environment"] = describe_environment(with_onnxruntime="onnxruntime" in plan.backends)
    if plan.device == "cuda" and (message := _no_cuda()) is not None:
        report.data["failures"].append({"step": "cuda", "message": message})
        report.finish()
        print(f"gpu-check: {message}\ngpu-check: wrote {report.path}", file=sys.stderr)
        return EXIT_NO_CUDA

    if args.skip_tests:
        report.skip("tests", "--skip-tests")
    else:
        with report.step("tests") as record:
            timeout = min(plan.tests_timeout, max(10.0, deadline - time.monotonic()))
            report.data["tests"] = run_cuda_tests(out / TESTS_FILE, plan.device == "cuda", timeout)
            record["summary"] = _tests_line(report.data["tests"])
            _check_tests(report.data["tests"], plan.device == "cuda")

    ceilings: dict[tuple[str, str], dict] = {}
    for arch in (plan.arch, None):  # the target model first: a run short of time keeps it
        for dtype in plan.dtypes if arch else _default_model_dtypes(plan):
            name = f"in-process {arch or 'default'} {dtype}"
            if deadline - time.monotonic() < 20:
                report.skip(name, "the run's time budget is spent")
                continue
            with report.step(name):
                ceilings[(arch or "default", dtype)] = measure_in_process(arch, dtype, plan, report)
            _release_device_memory()

    with contextlib.ExitStack() as stack:
        load = None
        for case in served_cases(plan):
            reason = _why_not(case, plan, report.data["environment"], deadline)
            if reason:
                report.skip(f"served {case.name}", reason)
                continue
            if load is None:
                load = stack.enter_context(LoadProcesses(plan.load_processes))
            with report.step(f"served {case.name}"):
                serve_and_load(case, plan, ceilings, load, report, deadline)

    with report.step("targets"):
        report.data["targets"] = judge_targets(plan, report.data["served"], ceilings)
    ok = report.finish()
    _print_summary(report.data)
    print(f"gpu-check: wrote {report.path}", file=sys.stderr)
    return 0 if ok else EXIT_FAILED


def describe_environment(with_onnxruntime: bool = True) -> dict:
    """Versions and places of everything the check runs on, and whether the stubs import (the code
    generated from proto/ checks protobuf's and grpcio's versions as it loads). Packages are found, not
    imported (onnxscript alone takes seconds), except onnxruntime, for its providers, when it is used."""
    import torch

    from ._report import describe_machine

    cuda: dict = {"available": torch.cuda.is_available(), "torch_cuda": torch.version.cuda}
    if cuda["available"]:
        cuda["cudnn"] = torch.backends.cudnn.version()
        cuda["devices"] = []
        for index in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(index)
            cuda["devices"].append({
                "name": p.name,
                "capability": f"{p.major}.{p.minor}",
                "memory_gib": round(p.total_memory / 2**30, 1),
                "multiprocessors": p.multi_processor_count,
            })  # fmt: skip
    smi = shutil.which("nvidia-smi")
    if smi:
        query = "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem"
        done = subprocess.run(
            [smi, query, "--format=csv,noheader"], capture_output=True, text=True, timeout=30
        )
        cuda["nvidia_smi"] = (done.stdout or done.stderr).strip()
    packages = {name: _package(name, dist) for name, dist in PACKAGES.items()}
    if with_onnxruntime and "version" in packages["onnxruntime"]:
        packages["onnxruntime"]["providers"] = import_module("onnxruntime").get_available_providers()
    try:
        import_module("cbam.v1.inference_pb2")
        import_module("cbam.v1.inference_pb2_grpc")
        stubs = "ok"
    except Exception as exc:
        stubs = f"{type(exc).__name__}: {exc}"
    return {
        "machine": describe_machine(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "cuda": cuda,
        "packages": packages,
        "stubs_import": stubs,
    }


def _package(name: str, distribution: str) -> dict:
    """Version and folder of what `import name` would load (both follow sys.path, PYTHONPATH first)."""
    try:
        spec = find_spec(name)
        version = metadata.version(distribution)
    except (ImportError, ValueError, metadata.PackageNotFoundError) as exc:
        return {"missing": f"{type(exc).__name__}: {exc}"}
    if spec is None:
        return {"missing": f"no module named {name!r}"}
    if spec.origin and spec.origin != "namespace":
        where = str(Path(spec.origin).parent)  # a package's folder, or the folder of a one-file module
    else:
        where = next(iter(spec.submodule_search_locations or []), None)
    return {"version": version, "from": where}


def _no_cuda() -> str | None:
    """None when CUDA is usable, else why not."""
    import torch

    if torch.cuda.is_available():
        return None
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    return (
        f"CUDA asked for, but torch {torch.__version__} ({build}) sees no CUDA device "
        f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
        "nothing was measured. On a machine without a GPU, run the CPU dry run: --dry-run"
    )


def run_cuda_tests(junit: Path, require_cuda: bool, timeout: float) -> dict:
    """pytest tests/cuda -m cuda in a subprocess; its counts and failures, from its JUnit XML."""
    junit.unlink(missing_ok=True)
    command = [sys.executable, "-m", "pytest", "tests/cuda", "-m", "cuda", "-q", "-p", "no:cacheprovider"]
    command += [f"--junitxml={junit}"] + (["--require-cuda"] if require_cuda else [])
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        exit_code, output = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as exc:
        exit_code, output = None, f"timed out after {timeout:.0f} s\n{exc.stdout or ''}"
    result = {"command": " ".join(command[1:]), "exit_code": exit_code, "output_tail": output[-4000:]}
    if junit.exists():
        result.update(_junit_summary(junit))
    return result


def _junit_summary(path: Path) -> dict:
    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {
        key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")
    }
    problems, skips = [], set()
    for case in root.iter("testcase"):
        test = f"{case.get('classname')}::{case.get('name')}"
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                problems.append({"test": test, "kind": kind, "message": (node.get("message") or "")[:1500]})
        node = case.find("skipped")
        if node is not None:
            skips.add((node.get("message") or "")[:300])
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "passed": passed, "problems": problems, "skip_reasons": sorted(skips)}


def _tests_line(tests: dict) -> str:
    if "tests" not in tests:
        return f"pytest exited {tests['exit_code']} with no report"
    return (
        f"{tests['passed']} passed, {tests['failures']} failed, {tests['errors']} errors, "
        f"{tests['skipped']} skipped"
    )


def _check_tests(tests: dict, require_cuda: bool) -> None:
    if tests["exit_code"] != 0:
        names = ", ".join(p["test"].rsplit("::", 1)[-1] for p in tests.get("problems", []))
        raise RuntimeError(
            f"pytest exited {tests['exit_code']} ({_tests_line(tests)}): {names or 'see output_tail'}"
        )
    if require_cuda and not tests.get("passed"):
        raise RuntimeError("no test marked cuda ran")


def measure_in_process(arch: str | None, dtype: str, plan: Plan, report: Report) -> dict:
    """The ceilings (bare forward; run_batch from uint8) and the attention-map cost, in this process."""
    import torch

    from server.config import ModelSettings
    from server.runner import BatchItem, ModelRunner, configure_malloc

    from ._ceiling import CeilingMeter, make_inputs

    configure_malloc()  # as the server does
    sizes = sorted(set(plan.ceiling_sizes) | set(plan.attention_sizes))
    settings = ModelSettings(arch=arch, device=plan.device, dtype=dtype)
    runner = ModelRunner.from_settings(settings, max_batch_size=max(sizes))
    device, input_size = runner.device, runner.description.input_size

    def forward(x: torch.Tensor) -> None:
        runner.model(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # the forward is asynchronous: time it to the end

    floats = {
        size: x.to(device=device, dtype=runner.dtype)
        for size, x in make_inputs(input_size, plan.ceiling_sizes).items()
    }
    pixels = torch.randint(0, 256, (max(sizes), *input_size, 3), dtype=torch.uint8)
    blocks = frozenset(runner.description.attention_blocks)
    meters = {
        "forward": CeilingMeter(forward, input_size, (), plan.ceiling_seconds, inputs=floats),
        "uint8": CeilingMeter(
            runner.run_batch, input_size, (), plan.ceiling_seconds,
            inputs={size: [BatchItem(p) for p in pixels[:size]] for size in sizes},
        ),
        "maps": CeilingMeter(
            runner.run_batch, input_size, (), plan.ceiling_seconds,
            inputs={size: [BatchItem(p, blocks) for p in pixels[:size]] for size in plan.attention_sizes},
        ),
    }  # fmt: skip
    for _ in range(2):  # two rounds, interleaved, so a slow spell falls on every meter
        for meter in meters.values():
            meter.round()
    results = {kind: meter.result() for kind, meter in meters.items()}
    model = arch or "default"
    for kind, label in (("forward", "float batch on the device, forward only"),
                        ("uint8", "uint8 pixels through ModelRunner.run_batch")):  # fmt: skip
        report.data["ceilings"].append({
            "model": model, "dtype": dtype, "device": str(device), "input_size": list(input_size),
            "input": label, "kind": kind, **results[kind].as_dict(),
        })  # fmt: skip
    without, with_maps = results["uint8"], results["maps"]
    report.data["attention"].append({
        "model": model, "dtype": dtype, "blocks": len(blocks),
        "by_batch_size": {
            str(size): {
                "without_maps_ms": without.latency_ms[size],
                "with_maps_ms": with_maps.latency_ms[size],
                "ratio": with_maps.latency_ms[size] / without.latency_ms[size],
            }
            for size in plan.attention_sizes
        },
    })  # fmt: skip
    return {"forward": results["forward"], "uint8": results["uint8"]}


def _release_device_memory() -> None:
    """Give back what the in-process runners held, so the servers started next get the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _why_not(case: Case, plan: Plan, environment: dict, deadline: float) -> str | None:
    """Why a served case cannot run in this run, or None."""
    left = deadline - time.monotonic()
    if case.backend == "compile" and plan.device != "cuda":
        return "compile is not served in the CPU dry run: Inductor takes minutes per bucket on this CPU"
    if case.backend == "onnxruntime":
        providers = environment.get("packages", {}).get("onnxruntime", {}).get("providers")
        if providers is None:
            return "onnxruntime is not installed"
        if plan.device == "cuda" and "CUDAExecutionProvider" not in providers:
            return (
                f"this onnxruntime has no CUDAExecutionProvider (only {providers}): it would run on the CPU"
            )
    load_seconds = len(plan.concurrency) * (plan.duration + plan.warmup)
    # compile builds a graph per batch bucket before SERVING: minutes for a ResNet-50 (docs/PERFORMANCE.md)
    needed = 150 + load_seconds if case.backend == "compile" else 15 + 1.5 * load_seconds
    if left < needed:
        alone = (
            f"; measure it alone: --backends compile --dtypes {case.dtype} --skip-tests"
            if case.backend == "compile"
            else ""
        )
        return f"the run's time budget is spent ({left:.0f} s left, about {needed:.0f} s needed){alone}"
    return None


def serve_and_load(
    case: Case, plan: Plan, ceilings: dict, load: LoadProcesses, report: Report, deadline: float
) -> None:
    """Start cbam-serve for `case`, drive each concurrency, read its CUDA memory; raise on any error."""
    import numpy as np

    from client import Client

    record: dict = {"case": case.name, "model": case.model, "dtype": case.dtype, "backend": case.backend}
    report.data["served"].append(record)
    server = LaunchedServer(
        case.flags(plan.device), startup_timeout=max(30.0, deadline - time.monotonic() - 10)
    )
    record["flags"] = server.args[3:]
    started = time.monotonic()
    try:
        server.start()
    except RuntimeError as exc:
        raise RuntimeError(
            f"not SERVING within {server.startup_timeout:.0f} s, or it exited: {exc}"
        ) from None
    try:
        record["time_to_serving_s"] = time.monotonic() - started
        with Client(server.target, timeout=60) as client:
            info = client.model_info()
        record.update(served_device=info.device, served_dtype=info.dtype)
        record["max_batch_size"] = info.batching.max_batch_size
        if info.dtype != case.dtype or not info.device.startswith(plan.device):
            raise RuntimeError(
                f"asked for {plan.device} {case.dtype}, the server runs {info.device} {info.dtype}"
            )
        ceiling = ceilings.get((case.model, case.dtype), {}).get("uint8")
        record["ceiling"] = (
            None if ceiling is None else "in-process, eager, same model and dtype, uint8 input"
        )
        image = np.random.default_rng(0).integers(0, 256, (*info.input_size, 3), dtype=np.uint8)
        rows = record["rows"] = []
        for concurrency in plan.concurrency:
            result = load.drive(
                server.target, image, concurrency=concurrency, seconds=plan.duration,
                warmup_seconds=plan.warmup, metrics_url=server.metrics_url,
            )  # fmt: skip
            rows.append(_row(result.summary(), ceiling, record["max_batch_size"]))
        record["memory"] = read_cuda_memory(server.metrics_url)
    finally:
        server.stop()
    errors = {code: n for row in rows for code, n in row["error_codes"].items()}
    if errors:
        raise RuntimeError(f"calls failed: {errors}")
    if plan.device == "cuda" and not record["memory"]:
        raise RuntimeError(f"the server's /metrics has none of {CUDA_GAUGES}")


def _row(summary: dict, ceiling, max_batch_size: int) -> dict:
    """A load point's figures, with served over the ceiling at the same mean batch size and at its best."""
    row = {key: summary[key] for key in ("concurrency", "throughput", "p50", "p99", "mean_batch_size")}
    row.update(requests=summary["requests"], errors=summary["errors"], error_codes=summary["error_codes"])
    batch = summary["mean_batch_size"]
    if ceiling is None or batch is None:
        row.update(ceiling_throughput=None, efficiency=None, of_best_ceiling=None)
        return row
    best = max(
        t for size, t in ceiling.throughput.items() if size <= max(max_batch_size, min(ceiling.throughput))
    )
    row["ceiling_throughput"] = ceiling.throughput_at(batch)
    row["efficiency"] = summary["throughput"] / row["ceiling_throughput"]
    row["of_best_ceiling"] = summary["throughput"] / best  # the best batch this max_batch_size allows
    return row


def read_cuda_memory(metrics_url: str) -> dict:
    """The server's CUDA memory gauges: {labels: {allocated_bytes, reserved_bytes}}, one entry per
    device (and per worker, should workers label them)."""
    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    memory: dict = {}
    for family in text_string_to_metric_families(text):
        if family.name in CUDA_GAUGES:
            for sample in family.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
                kind = family.name.removeprefix("cbam_cuda_memory_")
                memory.setdefault(labels, {})[kind] = sample.value
    return memory


def judge_targets(plan: Plan, served: list[dict], ceilings: dict) -> dict:
    """Issue 16's targets for `plan.arch` in the target dtype; None where a figure is missing."""
    dtype = plan.dtypes[0]
    mine = [r for r in served if r["model"] == plan.arch and r["dtype"] == dtype and r.get("rows")]
    by_case = {}
    for record in mine:
        rows = [row for row in record["rows"] if row["efficiency"] is not None]
        if rows:
            best = max(rows, key=lambda row: row["throughput"])
            by_case[record["case"]] = {
                key: best[key] for key in ("concurrency", "throughput", "efficiency", "of_best_ceiling")
            }
    best_case = max(by_case, key=lambda name: by_case[name]["efficiency"], default=None)
    forward = ceilings.get((plan.arch, dtype), {}).get("forward")
    default = next((r for r in mine if r["case"] == Case(plan.arch, dtype).name), None)
    single = next((row for row in (default or {}).get("rows", []) if row["concurrency"] == 1), None)
    overhead = None
    if single is not None and single["p50"] is not None and forward is not None and 1 in forward.latency_ms:
        overhead = single["p50"] - forward.latency_ms[1]
    everything = [(r["case"], row) for r in served if r["model"] == plan.arch for row in r.get("rows", [])]
    fastest = max(everything, key=lambda pair: pair[1]["throughput"], default=None)
    return {
        "figures_from": "a GPU" if plan.device == "cuda" else "the CPU dry run: not GPU figures",
        "saturation": {
            "target": f"{plan.arch} {dtype}: served >= {SATURATION_TARGET:.2f} x the in-process ceiling "
            "with uint8 input at the same mean batch size, at the best concurrency",
            "by_case": by_case,
            "best_case": best_case,
            "met": None if best_case is None else by_case[best_case]["efficiency"] >= SATURATION_TARGET,
        },
        "batch1_latency": {
            "target": f"{plan.arch} {dtype} eager: served p50 at concurrency 1 <= bare batch-1 forward + "
            f"{BATCH1_OVERHEAD_TARGET_MS:g} ms",
            "served_p50_ms": None if single is None else single["p50"],
            "forward_ms": None if forward is None else forward.latency_ms.get(1),
            "overhead_ms": overhead,
            "met": None if overhead is None else overhead <= BATCH1_OVERHEAD_TARGET_MS,
        },
        "fastest_served": None
        if fastest is None
        else {"case": fastest[0], **{k: fastest[1][k] for k in ("concurrency", "throughput", "p50", "p99")}},
    }


def _print_summary(data: dict) -> None:
    """A short table last: the device call's reply carries the end of the output."""
    print(f"\nGPU check ({data['mode']}): {'OK' if data['ok'] else 'FAILED'} in {data['seconds']} s")
    environment = data["environment"]
    if environment:
        cuda, packages = environment["cuda"], environment["packages"]
        devices = ", ".join(d["name"] for d in cuda.get("devices", [])) or "no CUDA device"
        print(
            f"  {devices}; torch {packages['torch'].get('version')}, CUDA {cuda['torch_cuda']}, cuDNN "
            f"{cuda.get('cudnn')}; grpcio {packages['grpc'].get('version')}, protobuf "
            f"{packages['google.protobuf'].get('version')}; stubs: {environment['stubs_import']}"
        )
    for step in data["steps"]:
        detail = step.get("summary") or step.get("reason") or (step.get("error") or "").split("\n")[0]
        print(f"  {step['status']:8} {step['name']}" + (f": {detail}" if detail else ""))
    for record in data["served"]:
        serving = record.get("time_to_serving_s")
        print(f"  {record['case']}: SERVING after {serving:.1f} s" if serving else f"  {record['case']}:")
        for row in record.get("rows", []):
            ratio = "" if row["efficiency"] is None else f", {row['efficiency']:.2f} of the ceiling"
            p50 = "-" if row["p50"] is None else f"{row['p50']:.2f}"
            p99 = "-" if row["p99"] is None else f"{row['p99']:.2f}"
            figures = f"{row['throughput']:.1f} images/s, p50 {p50} ms, p99 {p99} ms{ratio}"
            print(f"    c={row['concurrency']}: {figures}")
    for name in ("saturation", "batch1_latency"):
        target = data["targets"].get(name)
        if target:
            print(f"  target {name}: {target['met']} ({target['target']})")


def _say(message: str) -> None:
    print(f"gpu-check: {message}", file=sys.stderr, flush=True)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.gpu_check",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--dry-run", action="store_true", help="the CPU, small models, tiny counts")
    parser.add_argument("--out", type=Path, default=ROOT / "out" / "gpu-check", help="folder of the report")
    parser.add_argument("--arch", help=f"the large model served with --arch (default {GPU.arch}; dry run "
                        f"{DRY_RUN.arch})")  # fmt: skip
    parser.add_argument(
        "--dtypes", help="comma-separated, the target's first (default float16,bfloat16,float32)"
    )
    parser.add_argument("--backends", help="comma-separated subset of eager,onnxruntime,compile")
    parser.add_argument("--concurrency", help="comma-separated (default 1,32,128)")
    parser.add_argument("--duration", type=float, help="measuring window per load point, seconds")
    parser.add_argument("--load-processes", type=int, help="load-generator processes (default 4)")
    parser.add_argument("--budget-seconds", type=float, help="time for the whole run (default 285)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests marked cuda")
    return parser


_CHOICES = {"dtypes": ("float32", "float16", "bfloat16"), "backends": ("eager", "onnxruntime", "compile")}


def _plan(args: argparse.Namespace) -> Plan:
    """The preset (GPU, or the dry run's), with what the flags change. Raises ValueError on a bad list."""
    plan = DRY_RUN if args.dry_run else GPU
    changes: dict = {}
    for name in ("dtypes", "backends", "concurrency"):
        text = getattr(args, name)
        if text is None:
            continue
        values = tuple(part.strip() for part in text.split(",") if part.strip())
        if name == "concurrency":
            if not values or not all(v.isdigit() and int(v) >= 1 for v in values):
                raise ValueError(f"--concurrency should list integers >= 1, got {text!r}")
            values = tuple(int(v) for v in values)
        elif not values or not set(values) <= set(_CHOICES[name]):
            raise ValueError(f"--{name} should list some of {','.join(_CHOICES[name])}, got {text!r}")
        changes[name] = values
    for name in ("arch", "duration", "load_processes", "budget_seconds"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    return dataclasses.replace(plan, **changes)


if __name__ == "__main__":
    sys.exit(main())
