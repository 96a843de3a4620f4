"""Helpers of the deployment tests (a uniquely named module: every tests/ folder has a conftest.py)."""

from __future__ import annotations

import functools
import importlib.util
import json
import re
import shutil
import signal
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support import free_port, wait_for

REPO = Path(__file__).resolve().parents[2]


def load_yaml_documents(path: Path) -> list[dict]:
    """Every non-empty YAML document of ``path``."""
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def install_debian_package(package: str) -> str:
    """Try `apt-get install package` (as scripts/setup.sh --test does); return what went wrong, or ''."""
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    for command in (
        ["apt-get", "update", "-qq"],
        ["apt-get", "install", "-y", "-qq", "--no-install-recommends", package],
    ):
        try:
            done = subprocess.run(
                command,
                capture_output=True,
                text=True,
                timeout=600,
                env={"DEBIAN_FRONTEND": "noninteractive", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin"},
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"{' '.join(command)}: {exc}"
        if done.returncode != 0:
            return f"{' '.join(command)} exited {done.returncode}: {done.stderr.strip()[-300:]}"
    return ""


class Processes:
    """Starts processes with their output in files, and stops every one of them at teardown."""

    def __init__(self, log_dir: Path) -> None:
        self._log_dir = log_dir
        self._running: list[tuple[subprocess.Popen, Path]] = []

    def start(self, name: str, argv: list[str], **kwargs) -> subprocess.Popen:
        log = self._log_dir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, **kwargs
            )
        self._running.append((process, log))
        return process

    def log(self, process: subprocess.Popen) -> str:
        """The last lines a process printed (for failure messages)."""
        for running, log in self._running:
            if running is process:
                return "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise ValueError(f"process {process.pid} was not started here")

    def stop_all(self) -> None:
        for process, _ in reversed(self._running):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process, _ in reversed(self._running):
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=10)
        self._running.clear()


def _ready_or_exited(process: subprocess.Popen, url: str) -> bool:
    if process.poll() is not None:
        return True  # the caller says why
    with urllib.request.urlopen(f"{url}/-/ready", timeout=5) as response:
        return response.status == 200


def start_prometheus(processes: Processes, binary: str, config: dict, home: Path, *flags: str) -> str:
    """Run a real Prometheus with ``config`` on a free loopback port, storing under ``home``; its URL once
    it is ready. ``flags`` are more command-line flags (--enable-feature=...)."""
    config_path = home / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    for _attempt in range(3):  # the free port can be taken between choosing and binding it
        url = f"http://127.0.0.1:{free_port()}"
        process = processes.start(
            "prometheus",
            [
                binary,
                f"--config.file={config_path}",
                f"--storage.tsdb.path={home / 'data'}",
                f"--web.listen-address={url.removeprefix('http://')}",
                "--storage.tsdb.retention.time=1h",
                *flags,
            ],
        )
        try:
            wait_for(functools.partial(_ready_or_exited, process, url), timeout_s=120, what="Prometheus")
        except pytest.fail.Exception:
            pytest.fail(f"Prometheus not ready after 120 s:\n{processes.log(process)}")
        if process.poll() is None:
            return url
        if "address already in use" not in processes.log(process):
            pytest.fail(f"Prometheus exited with {process.returncode}:\n{processes.log(process)}")
    pytest.fail("Prometheus found no free port in 3 tries")


def nginx_renderer():
    """deploy/nginx/render_conf.py as a module (deploy/ is not a package)."""
    spec = importlib.util.spec_from_file_location("render_conf", REPO / "deploy/nginx/render_conf.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def http_get_json(url: str, timeout_s: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout_s) as response:
        return json.loads(response.read())


def exported_sample_names(metrics_text: str) -> set[str]:
    """Every sample name a /metrics page can carry, from its # TYPE lines: a histogram exports
    _bucket/_sum/_count, a counter _total, an info metric _info (and prometheus_client adds _created)."""
    suffixes = {
        "counter": ("_total", "_created"),
        "histogram": ("_bucket", "_sum", "_count", "_created"),
        "summary": ("", "_sum", "_count", "_created"),
        "info": ("_info",),
        "gauge": ("",),
        "stateset": ("",),
        "unknown": ("",),
    }
    names = set()
    for family in text_string_to_metric_families(metrics_text):
        names |= {family.name + suffix for suffix in suffixes[family.type]}
    return names


def promql_names(expr: str) -> tuple[set[str], set[str]]:
    """(metric names, recording-rule names) an expression reads. Metric names are those with the
    service's prefixes cbam_ and grpc_server_ (plus Prometheus' own `up`); recorded names are the ones
    with a colon."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values are not names
    tokens = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", expr))
    recorded = {t for t in tokens if ":" in t}
    metrics = {t for t in tokens - recorded if t.startswith(("cbam_", "grpc_server_"))} | ({"up"} & tokens)
    return metrics, recorded
