"""Running Locust on our locustfile as a subprocess (it patches the standard library with gevent on
import, which has no place inside pytest's own process), and reading its CSV statistics."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

from server.launcher import child_env
from tests.support import ROOT, free_port

LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"


def locust(*args: str) -> list[str]:
    """The command line of Locust on our locustfile."""
    executable = Path(sys.executable).parent / "locust"
    command = [str(executable)] if executable.exists() else [sys.executable, "-m", "locust"]
    return [*command, "-f", str(LOCUSTFILE), *args]


def bounded_run(requests: int) -> list[str]:
    """Headless Locust options for a run of 4 users that ends once ``requests`` requests were recorded,
    however slow the machine (--run-time is only a cap a working run never reaches)."""
    return ["--headless", "-u", "4", "-r", "4", "--cbam-requests", str(requests), "-t", "300s",
            "--only-summary", "--stop-timeout", "30"]  # fmt: skip


def run_env() -> dict[str, str]:
    return child_env({"PYTHONWARNINGS": "ignore"})


def start(command: list[str], log: Path) -> subprocess.Popen:
    """Start `command` in the background, its output going to `log` (the child keeps its own handle)."""
    with open(log, "w") as handle:
        return subprocess.Popen(command, cwd=ROOT, env=run_env(), stdout=handle, stderr=subprocess.STDOUT)


def stats(csv_prefix: Path) -> dict[str, dict[str, str]]:
    """Locust's <prefix>_stats.csv by request name ("Aggregated" for the total)."""
    with open(f"{csv_prefix}_stats.csv", newline="") as handle:
        return {row["Name"]: row for row in csv.DictReader(handle)}


def run_distributed(host: str, tmp_path: Path, *args: str, workers: int = 2) -> str:
    """Run Locust headless as a master with `workers` workers against `host`, writing CSV statistics
    to tmp_path/"dist"; returns the master's log once every process exited 0 (all are killed on failure)."""
    port = str(free_port())
    master = start(
        locust(
            *args, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", port,
            "--expect-workers", str(workers), "--expect-workers-max-wait", "300",
            "--host", host, "--csv", str(tmp_path / "dist"),
        ),
        tmp_path / "master.log",
    )  # fmt: skip
    worker = locust("--worker", "--master-host", "127.0.0.1", "--master-port", port)
    started = [start(worker, tmp_path / f"worker{i}.log") for i in range(workers)]
    try:
        assert master.wait(timeout=400) == 0, (tmp_path / "master.log").read_text()
        for process in started:
            assert process.wait(timeout=120) == 0
    finally:
        for process in (master, *started):
            if process.poll() is None:
                process.kill()
                process.wait()
    return (tmp_path / "master.log").read_text()
