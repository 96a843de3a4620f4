"""Helpers for tests that need a real cbam-serve: ``ServerProcess`` runs ``python -m server``.

    with ServerProcess("--batching.max_batch_size", "8", env={"CBAM_LOG__LEVEL": "DEBUG"}) as server:
        channel = grpc.insecure_channel(server.address)       # "127.0.0.1:PORT"
        urllib.request.urlopen(server.metrics_url)            # "http://127.0.0.1:PORT/metrics"
        assert server.stop(signal.SIGTERM, timeout=30) == 0   # exit status

The server binds port 0 and metrics port 0 on 127.0.0.1 (later args override these), its
environment has no CBAM_* variable but those in ``env``, and it is killed on exit whatever happened.
Its log lines are kept, parsed, in ``events``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["ROOT", "ServerProcess", "server_env"]

ROOT = Path(__file__).resolve().parents[1]


def server_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment a test server runs in: ours without CBAM_* and OTEL_* (which can turn tracing
    on), the sources on the path, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("CBAM_", "OTEL_"))}
    base["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "proto"), base.get("PYTHONPATH", "")]).rstrip(
        os.pathsep
    )
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **(env or {})}


def _last_flag(args: list[str], flag: str) -> str:
    value = ""
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def _connect_host(bound: str) -> str:
    if bound in ("", "[::]", "::", "0.0.0.0"):
        return "127.0.0.1"
    if ":" in bound and not bound.startswith("["):
        return f"[{bound}]"
    return bound


class ServerProcess:
    """A ``cbam-serve`` subprocess, started on ``__enter__`` and ready (SERVING) when it returns."""

    command: tuple[str, ...] = ("-m", "server")  # what the interpreter runs, before the arguments

    def __init__(
        self,
        *args: str,
        env: dict[str, str] | None = None,
        startup_timeout: float = 90.0,
        host: str = "127.0.0.1",
    ) -> None:
        self.args = [
            "--host", host, "--port", "0", "--metrics.host", host, "--metrics-port", "0", *args,
        ]  # fmt: skip
        self.env = server_env(env)
        self.startup_timeout = startup_timeout
        self.host = host
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []  # every line the server wrote (stdout and stderr together)
        self.events: list[dict[str, Any]] = []  # the lines that are JSON log events
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._serving = threading.Event()
        self._reader: threading.Thread | None = None

    @property
    def address(self) -> str:
        """Where to connect: the last ``--host`` given (an any-address means 127.0.0.1), and the port."""
        return f"{_connect_host(_last_flag(self.args, '--host'))}:{self.port}"

    @property
    def metrics_url(self) -> str:
        host = _connect_host(_last_flag(self.args, "--metrics.host"))
        return f"http://{host}:{self.metrics_port}/metrics"

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, *self.command, *self.args],
            cwd=ROOT, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
        )  # fmt: skip
        self._reader = threading.Thread(target=self._read, name="server-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._serving.wait(0.05):
            if self.process.poll() is not None:
                self._reader.join(timeout=5)
                raise RuntimeError(
                    f"cbam-serve exited with {self.process.returncode} before serving:\n{self.output}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"cbam-serve not serving after {self.startup_timeout}s:\n{self.output}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit status (killing the server if it takes over ``timeout``)."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                raise
        if self._reader is not None:
            self._reader.join(timeout=5)
        return self.process.returncode

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        if self._reader is not None:
            self._reader.join(timeout=5)
        if self.process is not None and self.process.stdout is not None:
            self.process.stdout.close()

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            self.events.append(event)
            if event.get("event") == "serving":
                self.port, self.metrics_port = int(event["port"]), event.get("metrics_port")
                self._serving.set()


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound, then released: good enough on loopback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def scrape(url: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of a /metrics page: (name, frozenset of label items) -> value."""
    with urllib.request.urlopen(url, timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of a /metrics page, its labels exactly ``labels`` (0 when absent)."""
    return scrape(url).get((name, frozenset(labels.items())), 0.0)
