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
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path

# No torch at import: the load-generator processes spawned from here import this module again.
from server.backends import list_backends  # names only: no torch

from ._cuda_tests import check_tests, run_cuda_tests, tests_line
from ._environment import describe_environment, no_cuda
from ._gpu_measure import measure_in_process, release_device_memory, serve_and_load
from ._processes import LoadProcesses

__all__ = ["main"]

ROOT = Path(__file__).resolve().parents[1]
REPORT_FILE = "gpu_check.json"
TESTS_FILE = "cuda_tests.xml"
EXIT_FAILED = 1
EXIT_NO_CUDA = 2
SATURATION_TARGET = 0.90  # served / in-process ceiling with uint8 input, at the best concurrency
BATCH1_OVERHEAD_TARGET_MS = 1.0  # served p50 at concurrency 1 minus the bare batch-1 forward


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

    def record(self) -> dict:
        """The start of this case's entry in the report."""
        return {"case": self.name, "model": self.model, "dtype": self.dtype, "backend": self.backend}

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
    if plan.device == "cuda" and (message := no_cuda()) is not None:
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
            record["summary"] = tests_line(report.data["tests"])
            check_tests(report.data["tests"], plan.device == "cuda")

    ceilings: dict[tuple[str, str], dict] = {}
    for arch in (plan.arch, None):  # the target model first: a run short of time keeps it
        for dtype in plan.dtypes if arch else _default_model_dtypes(plan):
            name = f"in-process {arch or 'default'} {dtype}"
            if deadline - time.monotonic() < 20:
                report.skip(name, "the run's time budget is spent")
                continue
            with report.step(name):
                found = measure_in_process(
                    arch, dtype, device=plan.device, ceiling_sizes=plan.ceiling_sizes,
                    attention_sizes=plan.attention_sizes, seconds=plan.ceiling_seconds,
                )  # fmt: skip
                ceilings[(arch or "default", dtype)] = found
                report.data["ceilings"] += found["ceilings"]
                report.data["attention"].append(found["attention"])
            release_device_memory()

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
                record = case.record()
                report.data["served"].append(record)
                serve_and_load(
                    record, case.flags(plan.device), device=plan.device, dtype=case.dtype,
                    concurrency=plan.concurrency, duration=plan.duration, warmup=plan.warmup,
                    ceiling=ceilings.get((case.model, case.dtype), {}).get("uint8"), load=load,
                    startup_timeout=max(30.0, deadline - time.monotonic() - 10),
                )  # fmt: skip

    with report.step("targets"):
        report.data["targets"] = judge_targets(plan, report.data["served"], ceilings)
    ok = report.finish()
    _print_summary(report.data)
    print(f"gpu-check: wrote {report.path}", file=sys.stderr)
    return 0 if ok else EXIT_FAILED


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
    parser.add_argument("--backends", help=f"comma-separated subset of {','.join(list_backends())}")
    parser.add_argument("--concurrency", help="comma-separated (default 1,32,128)")
    parser.add_argument("--duration", type=float, help="measuring window per load point, seconds")
    parser.add_argument("--load-processes", type=int, help="load-generator processes (default 4)")
    parser.add_argument("--budget-seconds", type=float, help="time for the whole run (default 285)")
    parser.add_argument("--skip-tests", action="store_true", help="do not run the tests marked cuda")
    return parser


_CHOICES = {"dtypes": ("float32", "float16", "bfloat16"), "backends": tuple(list_backends())}


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
