"""The Locust user, headless and in distributed mode, against a real cbam-serve on loopback."""

import subprocess

import pytest
from locust_run import bounded_run, free_port, locust, run_distributed, run_env, stats

from tests.support import ROOT

pytestmark = pytest.mark.slow  # each test runs Locust processes


def test_headless_run_reports_every_kind_of_call_and_writes_csv_and_html(live, tmp_path):
    # 400 requests: about 160 tasks, so each kind below is drawn many times (none is left out by chance).
    command = locust(
        *bounded_run(400), "--host", live.address, "--csv", str(tmp_path / "run"),
        "--html", str(tmp_path / "run.html"), "--cbam-attention-share", "0.3", "--cbam-stream-share", "0.3",
        "--cbam-stream-size", "4", "--cbam-batch-share", "0.3", "--cbam-batch-size", "3",
    )  # fmt: skip
    done = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    rows = stats(tmp_path / "run")
    assert int(rows["Aggregated"]["Request Count"]) >= 400
    for name in ("Classify", "Classify+attention", "ClassifyStream item", "ClassifyBatch item"):
        assert int(rows[name]["Request Count"]) > 0, name
        assert rows[name]["Type"] == "grpc"
        assert float(rows[name]["Average Content Size"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
    assert (tmp_path / "run.html").stat().st_size > 10_000


def test_failures_are_reported_as_failures(tmp_path):
    command = locust(*bounded_run(20), "--host", f"127.0.0.1:{free_port()}", "--csv", str(tmp_path / "down"))
    done = subprocess.run(command, cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1  # Locust's exit status when requests failed
    rows = stats(tmp_path / "down")
    assert int(rows["Classify"]["Failure Count"]) == int(rows["Classify"]["Request Count"]) >= 20


def test_distributed_master_and_two_workers(live, tmp_path):
    log = run_distributed(live.address, tmp_path, *bounded_run(200), "--cbam-stream-share", "0.5")
    assert "2 workers connected" in log and "to 2 ready workers" in log
    rows = stats(tmp_path / "dist")
    assert int(rows["Aggregated"]["Request Count"]) >= 200
    assert int(rows["Classify"]["Request Count"]) > 0
    assert int(rows["ClassifyStream item"]["Request Count"]) > 0
    assert int(rows["Aggregated"]["Failure Count"]) == 0
