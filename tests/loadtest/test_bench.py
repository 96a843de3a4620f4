"""cbam-bench: its parts, and tiny end-to-end runs that must report every field (not timed)."""

import json
import math
import os
import statistics
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from loadtest._ceiling import Ceiling
from loadtest._report import evaluate_targets
from loadtest._served import LoadResult, drive_load
from loadtest.bench import _settings, main
from server.launcher import child_env
from tests.support import ROOT

ROW_FIELDS = {"throughput", "p50", "p95", "p99", "mean_batch_size", "errors", "efficiency"}


def bench(*args: str, timeout: float = 850) -> subprocess.CompletedProcess:
    """A tiny run of cbam-bench. Its windows last at least until a call finished inside them, so even on
    a slow machine every row measured something."""
    command = [sys.executable, "-m", "loadtest.bench", "--ceiling-seconds", "0.05", *args]
    return subprocess.run(
        command, cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=timeout
    )


def check_report(report: dict, settings: set[str], concurrency: list[int]) -> None:
    assert set(report["machine"]) >= {"cpu", "cores", "usable_cores", "torch", "torch_threads"}
    assert report["ceiling"]["batch_1_latency_ms"] > 0
    assert {row["setting"] for row in report["results"]} == settings
    for row in report["results"]:
        assert set(row) >= ROW_FIELDS, row
        assert row["errors"] == 0 and row["requests"] > 0
        for name in ROW_FIELDS - {"errors"}:
            assert math.isfinite(row[name]) and row[name] > 0, (name, row)
        assert row["p50"] <= row["p95"] <= row["p99"]
        assert 1 <= row["mean_batch_size"] <= row["max_batch_size"]
        assert row["max_batch_delay_ms"] >= 0
    for setting in settings:
        assert [r["concurrency"] for r in report["results"] if r["setting"] == setting] == concurrency
    assert set(report["targets"]) == {
        "saturation_efficiency",
        "batch1_latency_overhead_ms",
        "batching_gain_at_concurrency_32",
    }


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_quick_run_starts_its_own_servers_and_reports_every_field(tmp_path):
    out, picture = tmp_path / "bench.json", tmp_path / "bench.png"
    tiny = ["--quick", "--concurrency", "1,4", "--duration", "1", "--warmup", "0.2"]
    done = bench(*tiny, "--json", str(out), "--plot", str(picture))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_report(report, {"32 (default)", "1"}, [1, 4])
    assert all(row["mean_batch_size_source"] == "metrics" for row in report["results"])
    assert report["model"]["input_size"] == [32, 32]
    assert "images/s" in done.stdout and "efficiency" in done.stdout  # the table
    with Image.open(picture) as image:
        assert image.format == "PNG" and image.width > 600


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_against_a_running_server(live, tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--concurrency", "2", "--duration", "1", "--warmup", "0.2"]
    done = bench("--target", live.address, "--metrics-url", live.metrics_url, *tiny, "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_report(report, {"32"}, [2])
    assert report["load"]["target"] == live.address


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_many_images_per_call(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--batch-sizes", "4", "--concurrency", "2", "--duration", "1", "--warmup", "0.2"]
    done = bench(*tiny, "--images-per-call", "6", "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_report(report, {"4"}, [2])
    (row,) = report["results"]
    assert row["images_per_call"] == 6 and report["load"]["images_per_call"] == 6
    assert row["throughput"] == pytest.approx(row["requests"] * 6 / row["seconds"])  # images, not calls
    assert row["mean_batch_size"] > 1  # a call's images share forward passes
    assert report["targets"]["batch1_latency_overhead_ms"]["met"] is None  # not one image's latency
    assert "ClassifyBatch of 6 images" in report["load"]["generator"]


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_an_architecture_by_name(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--batch-sizes", "1", "--concurrency", "1", "--duration", "1", "--warmup", "0.2"]
    done = bench("--arch", "cbam_resnet8_cifar", *tiny, "--json", str(out))
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    check_report(report, {"1"}, [1])
    assert report["model"]["arch"] == "cbam_resnet8_cifar" and report["model"]["version"] == "random-seed0"


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_worker_counts_compared_in_one_run_with_the_servers_cpu_per_image(tmp_path):
    out = tmp_path / "bench.json"
    tiny = ["--batch-sizes", "8", "--concurrency", "4", "--duration", "1", "--warmup", "0.2"]
    done = bench(*tiny, "--workers", "1,2", "--rounds", "2", "--json", str(out), timeout=850)
    assert done.returncode == 0, done.stderr
    report = json.loads(out.read_text())
    rows = report["results"]
    # A, B then B, A; each row says which server it measured and how the load reached it.
    assert [(r["workers"], r["round"]) for r in rows] == [(1, 1), (2, 1), (2, 2), (1, 2)]
    for row in rows:
        assert row["errors"] == 0 and row["setting"] == f"{row['workers']}w 8"
        assert row["channels"] == (1 if row["workers"] == 1 else 4)  # 8 per worker, one per caller at most
        shares = row["worker_share"]
        assert sorted(shares) == ([""] if row["workers"] == 1 else ["0", "1"])
        assert sum(shares.values()) == pytest.approx(1.0)
        cpu, forward, outside = (row[k] for k in ("server_cpu_ms_per_image", "forward_cpu_ms_per_image",
                                                  "outside_forward_cpu_ms_per_image"))  # fmt: skip
        assert cpu > 0 and forward > 0 and outside > 0 and outside == pytest.approx(cpu - forward)
        assert row["server_cores_used"] > 0 and row["forward_wall_ms_per_image"] > 0
    (compared,) = report["workers_comparison"]
    assert (compared["workers"], compared["base_workers"], compared["concurrency"]) == (2, 1, 4)
    assert len(compared["round_ratios"]) == 2 and compared["ratio"] > 0
    assert "2 workers / 1" in done.stderr


@pytest.mark.parametrize(
    "argv",
    [
        ["--quick", "--arch", "cbam_resnet50"],
        ["--concurrency", "0"],
        ["--batch-sizes", "x"],
        ["--payload", "gif"],
        ["--cbam-cost", "--quick"],
        ["--images-per-call", "0"],
        ["--cbam-cost", "--arch", "cbam_resnet50"],
        ["--workers", "0"],
        ["--rounds", "0"],
        ["--target", "127.0.0.1:1", "--workers", "2"],
    ],
)
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    assert exited.value.code == 2


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_cbam_cost_times_both_models_and_judges_the_target(tmp_path):
    out = tmp_path / "cost.json"
    # One core, hence one torch thread: two threads on a machine whose other core is busy wait on
    # each other and single passes vary tenfold; one thread shares its core evenly between the two
    # models. Three rounds, so the median ratio is one round's, whatever one odd round did.
    one_core = str(max(os.sched_getaffinity(0)))
    cost_args = ["--backend", "eager", "--cost-batch-sizes", "1,2", "--cost-rounds", "3"]
    done = bench("--cbam-cost", *cost_args, "--server-cpus", one_core, "--json", str(out))
    assert done.returncode == 0, done.stderr
    cost = json.loads(out.read_text())["cbam_cost"]
    assert cost["backend"] == "eager" and cost["input_size"] == [224, 224] and cost["rounds"] == 3
    assert cost["threads"] == 1
    assert set(cost["by_batch_size"]) == {"1", "2"} and cost["best_batch_size"] in (1, 2)
    for figures in cost["by_batch_size"].values():
        assert figures["cbam_resnet50_ms"] > 0 and figures["resnet50_ms"] > 0
        rounds = figures["round_ratios"]
        assert len(rounds) == 3 and figures["ratio"] == pytest.approx(statistics.median(rounds))
        # CBAM adds work: on any machine it is neither free nor several times the plain network. Unless
        # the machine was too busy to time anything: rounds that disagree by half say so (seen beside
        # other jobs: 0.97, 5.5 and 2.79 in one run), and no bound holds for them.
        if max(rounds) / min(rounds) < 1.5:
            assert 0.8 < figures["ratio"] < 3
    assert isinstance(cost["met"], bool)
    assert "ratio" in done.stdout and "resnet50" in done.stdout  # the table


def test_throughput_counts_calls_finishing_in_the_window_and_latency_those_wholly_in_it():
    """With calls as long as a third of the window, counting only calls wholly inside it would report
    two thirds of the real rate; every call finishing inside it is counted."""
    result = LoadResult(concurrency=3, seconds=9.0)
    start, end = 10.5, 19.5
    for caller in range(3):  # three callers, back to back, 3 s calls, staggered by 1 s
        t = 7.0 + caller
        while t < 22:
            result.record(t, t + 3.0, [1], start, end)
            t += 3.0
    summary = result.summary()
    assert summary["requests"] == 9  # one call per second finishes inside the window
    assert summary["throughput"] == pytest.approx(1.0)
    assert len(result.latencies) == 6 and all(latency == 3.0 for latency in result.latencies)


async def test_a_window_too_short_for_any_call_still_measures_one(live):
    """However slow the machine, a load run reports a measured call rather than an empty window."""
    image = np.zeros((32, 32, 3), np.uint8)
    result = await drive_load(live.address, image, concurrency=2, seconds=1e-6, warmup_seconds=0.0)
    summary = result.summary()
    assert summary["errors"] == 0 and summary["requests"] >= 1 and summary["p50"] > 0
    assert summary["seconds"] == result.seconds >= 1e-6
    assert summary["throughput"] == pytest.approx(summary["requests"] / result.seconds)


def test_batch_size_settings():
    assert _settings("default,1,8") == [None, 1, 8]
    with pytest.raises(ValueError, match="--batch-sizes"):
        _settings(",")


def test_ceiling_interpolates_in_log_batch_size_and_clamps():
    ceiling = Ceiling(threads=2, throughput={1: 100.0, 4: 300.0, 16: 500.0})
    assert ceiling.throughput_at(2) == pytest.approx(200.0)  # halfway between 1 and 4 in log2
    assert ceiling.throughput_at(8) == pytest.approx(400.0)
    assert ceiling.throughput_at(0.5) == 100.0 and ceiling.throughput_at(64) == 500.0


def _row(setting, max_batch_size, concurrency, throughput, p50, efficiency, mean_batch_size=1.0):
    return {
        "setting": setting,
        "max_batch_size": max_batch_size,
        "concurrency": concurrency,
        "throughput": throughput,
        "p50": p50,
        "efficiency": efficiency,
        "mean_batch_size": mean_batch_size,
    }


def test_targets_are_judged_from_the_rows():
    ceiling = Ceiling(threads=2, throughput={1: 500.0}, latency_ms={1: 2.0})
    rows = [
        _row("32 (default)", 32, 1, 150, 3.5, 0.3),
        _row("32 (default)", 32, 32, 900, 30, 0.95, 16),
        _row("1", 1, 1, 160, 3.0, 0.32),
        _row("1", 1, 32, 450, 60, 0.92),
    ]
    targets = evaluate_targets(rows, ceiling)
    assert targets["saturation_efficiency"]["met"] is True
    assert targets["saturation_efficiency"]["by_setting"]["32 (default)"]["concurrency"] == 32
    assert targets["batch1_latency_overhead_ms"]["overhead_ms"] == pytest.approx(1.5)
    assert targets["batch1_latency_overhead_ms"]["met"] is True
    assert targets["batching_gain_at_concurrency_32"]["gain"] == pytest.approx(2.0)
    assert targets["batching_gain_at_concurrency_32"]["met"] is True
    rows[1]["efficiency"] = 0.5
    assert evaluate_targets(rows, ceiling)["saturation_efficiency"]["met"] is False


@pytest.mark.slow
@pytest.mark.timeout(900)  # a cbam-bench run: minutes on a busy machine
def test_tracing_cost_serves_every_variant_interleaved_and_the_spans_reach_the_sink(tmp_path):
    out = tmp_path / "tracing.json"
    tiny = ["--tracing-rounds", "1", "--concurrency", "2", "--duration", "0.5", "--warmup", "0.2"]
    done = bench("--tracing-cost", *tiny, "--json", str(out), timeout=850)
    assert done.returncode == 0, done.stderr
    cost = json.loads(out.read_text())["tracing_cost"]
    assert set(cost["by_variant"]) == {"off", "on", "on, stage events"}
    for figures in cost["by_variant"].values():
        assert figures["errors"] == 0 and figures["throughput"] > 0
    assert set(cost["comparisons"]) == {"on / off", "on, stage events / off"}
    for comparison in cost["comparisons"].values():
        assert comparison["ratio"] > 0 and len(comparison["round_ratios"]) == 1
    # The traced servers exported to the sink (the last spans at their shutdown, at the latest).
    assert cost["sink"]["export_requests"] > 0 and cost["sink"]["bytes"] > 0
    assert "Tracing's cost" in done.stdout
