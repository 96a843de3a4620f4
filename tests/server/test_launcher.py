"""server/launcher.py: the cbam-serve child process (ready, stopped, killed, reaped) and /metrics reading."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

from server.launcher import ServerProcess, metric, run_to_exit, scrape


def _group_is_gone(pid: int) -> bool:
    try:
        os.killpg(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_scrape_reads_every_sample_and_metric_one_of_them(live):
    samples = scrape(live.metrics_url)
    info = [labels for name, labels in samples if name == "cbam_model_info"]
    assert len(info) == 1 and dict(info[0])["arch"] == "cbam_resnet8_cifar"
    assert samples.value("cbam_inflight_requests") == metric(live.metrics_url, "cbam_inflight_requests") == 0
    assert samples.value("cbam_requests_total", method="NoSuchMethod", code="OK") == 0  # absent: 0


def test_importing_the_launcher_does_not_import_torch():
    code = "import sys, server.launcher; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


@pytest.mark.slow
def test_stop_returns_the_exit_status_and_leaves_nothing_behind():
    with ServerProcess() as server:
        assert server.events_named("serving") and server.port and server.metrics_url
        assert server.stop(signal.SIGTERM) == 0
        assert server.events_named("stopped")  # its output was read to the end
    assert server.process.returncode == 0 and _group_is_gone(server.pid)


@pytest.mark.slow
def test_a_server_not_serving_in_time_is_killed_and_reaped():
    server = ServerProcess(startup_timeout=0.01)
    with pytest.raises(TimeoutError, match="not serving after"):
        server.start()
    assert server.process.returncode == -signal.SIGKILL and _group_is_gone(server.pid)


@pytest.mark.slow
def test_run_to_exit_stops_a_server_that_serves_instead():
    with pytest.raises(AssertionError, match="started serving where it should have exited"):
        run_to_exit()


def test_run_to_exit_reports_the_refusal():
    refused = run_to_exit("--batching.max_batch_size", "0")
    assert refused.returncode == 2 and "batching.max_batch_size" in refused.output
