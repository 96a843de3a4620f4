"""The GPU check (scripts/gpu_check.sh, loadtest/gpu_check.py) on this CPU: its dry run, end to end with
tiny counts, writes every part of the report; asked for CUDA where there is none, it fails at once and
says why; and the wheels it carries are the versions tested here. Its GPU figures come from a lent GPU
only (docs/PERFORMANCE.md, "The GPU check")."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from importlib import metadata

import pytest
import torch

from loadtest._cuda_tests import run_cuda_tests
from loadtest.gpu_check import main
from server.launcher import child_env
from tests.support import ROOT

no_cuda_here = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without CUDA")


def gpu_check(*args: str, timeout: float) -> subprocess.CompletedProcess:
    command = ["bash", str(ROOT / "scripts" / "gpu_check.sh"), *args]
    env = child_env({"PYTHON": sys.executable})
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(900)  # about 27 s of CPU; a machine shared with other test runs took 160 s
def test_the_dry_run_writes_every_part_of_the_report(tmp_path) -> None:
    tiny = ["--backends", "eager", "--concurrency", "2", "--duration", "1"]
    done = gpu_check("--dry-run", "--out", str(tmp_path), *tiny, timeout=850)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is True and report["failures"] == [] and report["mode"].startswith("dry-run")
    arch, dtypes = "cbam_resnet8_cifar", ("float32", "bfloat16")  # the dry run's stand-ins
    steps = {step["name"]: step for step in report["steps"]}
    assert list(steps) == [
        "environment",
        "tests",
        *(f"in-process {arch} {dtype}" for dtype in dtypes),
        "in-process default float32",
        *(f"served {arch} {dtype} eager" for dtype in dtypes),
        "served default float32 eager",
        "targets",
    ]
    assert all(step["status"] == "ok" and step["seconds"] >= 0 for step in steps.values()), steps

    environment = report["environment"]
    assert environment["stubs_import"] == "ok" and environment["cuda"]["available"] is False
    for package in ("torch", "grpc", "google.protobuf", "pydantic", "pydantic_settings", "grpc_health"):
        assert environment["packages"][package]["version"], package
    tests = report["tests"]  # without CUDA, and not required: every test marked cuda skipped, none failed
    assert tests["exit_code"] == 0 and tests["tests"] == tests["skipped"] > 0 and tests["problems"] == []
    assert any("no CUDA device usable" in reason for reason in tests["skip_reasons"])
    assert (tmp_path / "cuda_tests.xml").is_file()

    measured = {(c["model"], c["dtype"], c["kind"]) for c in report["ceilings"]}
    models = [(arch, dtype) for dtype in dtypes] + [("default", "float32")]
    assert measured == {(m, d, kind) for m, d in models for kind in ("forward", "uint8")}
    for ceiling in report["ceilings"]:
        assert set(ceiling["by_batch_size"]) == {"1", "2"} and ceiling["device"] == "cpu"
        assert all(figures["throughput"] > 0 for figures in ceiling["by_batch_size"].values())
    assert {(a["model"], a["dtype"]) for a in report["attention"]} == set(models)
    for attention in report["attention"]:
        assert attention["blocks"] > 0
        assert all(cost["ratio"] > 0 for cost in attention["by_batch_size"].values())

    served = {(record["model"], record["dtype"]): record for record in report["served"]}
    assert list(served) == models
    for record in served.values():
        assert record["backend"] == "eager" and record["time_to_serving_s"] > 0
        assert record["served_device"] == "cpu" and record["served_dtype"] == record["dtype"]
        assert record["memory"] == {}  # no CUDA gauges on the CPU
        (row,) = record["rows"]
        assert row["concurrency"] == 2 and row["errors"] == 0 and row["requests"] >= 0
    assert sum(record["rows"][0]["requests"] for record in served.values()) > 0
    assert set(report["targets"]) >= {"saturation", "batch1_latency", "fastest_served"}
    assert "not GPU figures" in report["targets"]["figures_from"]
    assert "GPU check (dry-run" in done.stdout  # the short table the device call's reply ends with


@no_cuda_here
@pytest.mark.timeout(400)
def test_asking_for_cuda_where_there_is_none_fails_at_once_and_says_why(tmp_path) -> None:
    done = gpu_check("--out", str(tmp_path), timeout=350)
    assert done.returncode == 2, done.stdout + done.stderr
    assert "CUDA asked for, but torch" in done.stderr and "--dry-run" in done.stderr
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["ok"] is False and report["mode"] == "gpu"
    assert [failure["step"] for failure in report["failures"]] == ["cuda"]
    assert report["tests"] is None and report["ceilings"] == [] and report["served"] == []


@pytest.mark.slow
@no_cuda_here
@pytest.mark.timeout(600)
def test_the_cuda_tests_fail_rather_than_skip_when_cuda_is_required(tmp_path) -> None:
    tests = run_cuda_tests(tmp_path / "cuda_tests.xml", require_cuda=True, timeout=550)
    assert tests["exit_code"] == 1, tests["output_tail"]
    assert tests["tests"] > 0 and tests["passed"] == tests["skipped"] == 0
    assert len(tests["problems"]) == tests["tests"]
    assert all("--require-cuda, but no CUDA device usable" in p["message"] for p in tests["problems"])


def test_bad_lists_are_refused_naming_the_flag(capsys) -> None:
    with pytest.raises(SystemExit) as refused:
        main(["--dry-run", "--dtypes", "float32,float64"])
    assert refused.value.code == 2 and "--dtypes should list some of" in capsys.readouterr().err


def test_the_carried_wheels_are_the_versions_tested_here() -> None:
    command = ["bash", str(ROOT / "scripts" / "gpu_wheels.sh"), "--print"]
    done = subprocess.run(command, env=child_env({"PYTHON": sys.executable}), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    pins = dict(line.split("==") for line in done.stdout.split())
    assert {"grpcio", "protobuf", "pydantic", "pydantic-settings", "grpcio-health-checking"} <= set(pins)
    assert all(pins[name] == metadata.version(name) for name in pins)
    # The generated stubs refuse a grpcio or protobuf older than the grpcio-tools that generated them.
    grpc_needs = _stub_needs("inference_pb2_grpc.py", "GRPC_GENERATED_VERSION = '")
    protobuf_needs = _stub_needs("inference_pb2.py", "Protobuf Python Version: ")
    assert _version(pins["grpcio"]) >= grpc_needs and _version(pins["protobuf"]) >= protobuf_needs


def _stub_needs(stub: str, before: str) -> tuple[int, ...]:
    code = (ROOT / "proto" / "cbam" / "v1" / stub).read_text()
    return _version(re.search(re.escape(before) + r"([\d.]+)", code)[1])


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:3])
