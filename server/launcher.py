"""Run cbam-serve as a child process (``python -m server``) and read its /metrics page.

The one way the tests, cbam-bench and scripts/soak.py start a server of their own:

    with ServerProcess("--batching.max_batch_size", "8") as server:   # SERVING when it returns
        server.address                                   # "127.0.0.1:PORT"
        metric(server.metrics_url, "cbam_requests_total", method="Classify", code="OK")
        assert server.stop(signal.SIGTERM) == 0          # the exit status

    refused = run_to_exit("--model.device", "quantum")   # a start that must fail
    assert refused.returncode == 2 and "model.device" in refused.output

The server binds port 0 and metrics port 0 on 127.0.0.1 unless the arguments say otherwise (a later
flag wins) and reports the ports it got in its JSON "serving" log line, which is what "ready" means
here, whoever writes it (one process, or a supervisor in front of workers). ``checkout=DIR`` runs the
server code of another source tree (a worktree of main, say) instead of this one. Every line it writes is
kept (``lines``), the JSON ones also parsed (``events``); a thread reads them as they come, so the
child never blocks on a full pipe. The child leads its own process group: leaving the ``with``
block (or the interpreter exiting) kills that whole group, whatever happened, and reaps it.

Imports nothing heavy: load generators and scripts use it without paying for torch.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = [
    "Exited",
    "Samples",
    "ServerExited",
    "ServerProcess",
    "child_env",
    "metric",
    "run_to_exit",
    "scrape",
]

# The repository this module runs from, when it runs from one (not from an installed wheel): its
# children run the same sources, whatever the installed package points at.
_CHECKOUT = Path(__file__).resolve().parents[1]
if not (_CHECKOUT / "pyproject.toml").is_file():
    _CHECKOUT = None


def child_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Python child: ours, this checkout's sources first on the path (when run
    from one), output unbuffered, plus ``env``."""
    base = dict(os.environ)
    if _CHECKOUT is not None:
        paths = [str(_CHECKOUT), str(_CHECKOUT / "proto"), base.get("PYTHONPATH", "")]
        base["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    base["PYTHONUNBUFFERED"] = "1"
    return {**base, **(env or {})}


def _checkout_env(checkout: Path, env: Mapping[str, str] | None) -> dict[str, str]:
    # Its packages and its proto/ first on the path; no __pycache__ written into someone else's tree.
    base = dict(os.environ)
    paths = [str(checkout), str(checkout / "proto"), base.get("PYTHONPATH", "")]
    base.update(PYTHONPATH=os.pathsep.join(p for p in paths if p), PYTHONDONTWRITEBYTECODE="1")
    return {**base, "PYTHONUNBUFFERED": "1", **(env or {})}


class ServerExited(RuntimeError):
    """The server exited before it was serving."""

    def __init__(self, returncode: int, output: str) -> None:
        super().__init__(f"cbam-serve exited with {returncode} before serving:\n{output[-4000:]}")
        self.returncode = returncode
        self.output = output


@dataclass(frozen=True)
class Exited:
    """How a server run to its end went: the exit status and everything it wrote."""

    returncode: int
    output: str


class ServerProcess:
    """``python -m server ARGS`` on free loopback ports; ``start()`` returns once it is SERVING."""

    command: tuple[str, ...] = ("-m", "server")  # what the interpreter runs, before the arguments

    def __init__(
        self,
        *args: str,
        env: Mapping[str, str] | None = None,
        startup_timeout: float = 300.0,
        host: str = "127.0.0.1",
        checkout: Path | None = None,
    ) -> None:
        self.args = [
            "--host", host, "--port", "0", "--metrics.host", host, "--metrics-port", "0", *args,
        ]  # fmt: skip
        self.checkout = checkout
        self.env = child_env(env) if checkout is None else _checkout_env(checkout, env)
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen[str] | None = None
        self.lines: list[str] = []  # everything the server wrote, stdout and stderr together
        self.events: list[dict[str, Any]] = []  # the lines that are JSON log events
        self.port: int | None = None
        self.metrics_port: int | None = None
        self._serving = threading.Event()
        self._reader: threading.Thread | None = None
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None, "not started"
        return self.process.pid

    @property
    def address(self) -> str:
        """Where to connect: the last ``--host`` given (an any-address means 127.0.0.1), and the port."""
        return f"{_connect_host(_last_flag(self.args, '--host'))}:{self.port}"

    @property
    def metrics_url(self) -> str | None:
        """The /metrics page, or None when the server has no metrics endpoint."""
        if self.metrics_port is None:
            return None
        return f"http://{_connect_host(_last_flag(self.args, '--metrics.host'))}:{self.metrics_port}/metrics"

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def serving(self) -> dict[str, Any]:
        """The "serving" log event (ports, backend, batching, threads...); empty before it came."""
        return next(iter(self.events_named("serving")), {})

    def events_named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self) -> None:
        """Start the server and wait for its "serving" line. Raises ServerExited when it exits first,
        TimeoutError (after killing it) when it is not serving within ``startup_timeout``."""
        assert self.process is None, "a ServerProcess starts once"
        self.process = subprocess.Popen(
            [sys.executable, *self.command, *self.args],
            cwd=self.checkout or _CHECKOUT, env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True, errors="replace", bufsize=1, start_new_session=True,
        )  # fmt: skip
        # Kills the group even if nobody calls kill(): on garbage collection or at interpreter exit.
        self._finalizer = weakref.finalize(self, _kill_group, self.process)
        self._reader = threading.Thread(target=self._read, name=f"cbam-serve-{self.pid}-log", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.startup_timeout
        while not self._serving.wait(0.05):
            if self.process.poll() is not None:
                self._reader.join(timeout=10)
                if self._serving.is_set():  # it served, then exited at once: that is for the caller
                    return
                raise ServerExited(self.process.returncode, self.output)
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(
                    f"cbam-serve not serving after {self.startup_timeout:.0f} s:\n{self.output[-4000:]}"
                )

    def send_signal(self, sig: int) -> None:
        """Send ``sig`` to the server's main process (a supervisor passes it on to its workers)."""
        assert self.process is not None, "not started"
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def wait(self, timeout: float | None = None) -> int:
        """Wait for the main process to exit and for its output to end; the exit status. Raises
        subprocess.TimeoutExpired (and leaves it running) when it takes over ``timeout``."""
        assert self.process is not None, "not started"
        code = self.process.wait(timeout)
        if self._reader is not None:
            self._reader.join(timeout=10)  # the rest of its output; a leftover child may hold the pipe
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        """Send ``sig`` (the server drains on SIGTERM and SIGINT) and return the exit status. When it has
        not exited within ``timeout``, kills the process group: the status is then -SIGKILL."""
        self.send_signal(sig)
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def kill(self) -> None:
        """SIGKILL the whole process group, whatever is left of it, and reap the server."""
        if self._finalizer is not None:
            self._finalizer()
        if self._reader is not None:
            self._reader.join(timeout=10)

    def _read(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        with self.process.stdout:
            for line in self.process.stdout:
                self.lines.append(line)
                if not line.startswith("{"):
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if not isinstance(event, dict):
                    continue
                self.events.append(event)
                if event.get("event") == "serving" and not self._serving.is_set():
                    self.port, self.metrics_port = int(event["port"]), event.get("metrics_port")
                    self._serving.set()


def _kill_group(process: subprocess.Popen) -> None:
    # The group outlives its leader while any member lives, and its id is not reused meanwhile.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(30)


def run_to_exit(
    *args: str, env: Mapping[str, str] | None = None, timeout: float = 300.0, command: tuple[str, ...] = ()
) -> Exited:
    """Start a server that is expected to refuse to start (bad settings, busy port...) and return how it
    exited; ``command`` replaces ``-m server``. Raises AssertionError (after stopping it) if it starts
    serving instead."""
    server = ServerProcess(*args, env=env, startup_timeout=timeout)
    if command:
        server.command = command
    try:
        server.start()
    except ServerExited as exited:
        return Exited(exited.returncode, exited.output)
    finally:
        server.kill()
    raise AssertionError(f"cbam-serve started serving where it should have exited:\n{server.output}")


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


# -- /metrics ----------------------------------------------------------------------------------------


class Samples(dict):
    """Every sample of one /metrics page: (name, frozenset of label items) -> value."""

    def value(self, name: str, **labels: str) -> float:
        """The sample called ``name`` whose labels are exactly ``labels``; 0 when there is none."""
        return self.get((name, frozenset(labels.items())), 0.0)


def scrape(url: str, timeout: float = 30.0) -> Samples:
    """Read a Prometheus text page (a server's /metrics) into Samples."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        text = response.read().decode()
    return Samples(
        ((sample.name, frozenset(sample.labels.items())), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    )


def metric(url: str, name: str, **labels: str) -> float:
    """One sample of the /metrics page at ``url``, its labels exactly ``labels`` (0 when absent)."""
    return scrape(url).value(name, **labels)
