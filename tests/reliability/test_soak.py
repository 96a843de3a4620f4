"""The soak command, short: `python scripts/soak.py --seconds 16` against its own server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from server.launcher import child_env
from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def test_a_short_soak_passes_and_reports_memory_errors_and_latency(tmp_path):
    report_path = tmp_path / "soak.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "16", "--warmup-seconds", "4",
         "--rate", "30", "--concurrency", "6", "--max-latency-drift", "3.0", "--json", str(report_path)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(report_path.read_text())
    assert report["passed"] and report["errors"] == 0
    assert report["ok"] > 200 and report["rejected_as_expected"] > 10
    assert report["server_exit_code"] == 0
    assert report["rss_start_mb"] > 0 and abs(report["rss_growth_mb"]) < 64
    assert report["latency_first"]["count"] > 0 and report["latency_last"]["count"] > 0
    for line in ("requests:", "rss:", "latency p50/p95/p99 ms:", "verdict: PASS"):
        assert line in result.stdout


def test_the_soak_fails_when_its_thresholds_are_not_met(live):
    """A check that cannot fail is worth nothing: an impossible error budget of -1 must fail it (here
    against the shared server: whose server does not matter to the verdict)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "soak.py"), "--seconds", "2", "--warmup-seconds", "1",
         "--rate", "10", "--max-errors", "-1", "--max-latency-drift", "1000", "--target", live.address],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=500,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout + result.stderr
    assert "verdict: FAIL (errors)" in result.stdout
