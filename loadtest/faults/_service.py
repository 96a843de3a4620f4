"""The services a fault run acts on: cbam-serve on a fixed loopback port (one process, or a supervisor
and its workers), and nginx in front of two replicas."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from server.launcher import ServerProcess, scrape

__all__ = ["Balanced", "Service", "nginx_binary"]

_ROOT = Path(__file__).resolve().parents[2]
_NGINX_TEMPLATE = _ROOT / "deploy" / "nginx" / "render_conf.py"
_STOP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(child) for child in f.read().split()]
    except OSError:
        return []


def _rss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # gone meanwhile
        return 0.0


def _flag(args: Sequence[str], name: str) -> str | None:
    value = None
    for i, arg in enumerate(args):
        if arg == name and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(name + "="):
            value = arg.split("=", 1)[1]
    return value


class Service:
    """cbam-serve with ``args`` on a port of its own that stays the same across restarts, so clients
    find a restarted server where they left it. ``--workers N`` among the args makes it a supervisor
    and N workers."""

    def __init__(self, args: Sequence[str] = (), *, startup_timeout: float = 300.0) -> None:
        self.args = list(args)
        self.workers = int(_flag(self.args, "--workers") or 1)
        self.port = _free_port()
        self.startup_timeout = startup_timeout
        self.server: ServerProcess | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def metrics_url(self) -> str:
        assert self.server is not None, "not started"
        return self.server.metrics_url

    @property
    def pid(self) -> int:
        """The main process: the server, or the supervisor of the workers."""
        assert self.server is not None and self.server.process is not None, "not started"
        return self.server.process.pid

    def __enter__(self) -> Service:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.kill()

    def start(self) -> None:
        """Start (again, after a stop) and return once it is serving."""
        if self.server is not None:
            self.server.kill()  # what is left of the last one: its output pipe
        self.server = ServerProcess(
            *self.args, "--port", str(self.port), startup_timeout=self.startup_timeout
        )
        self.server.start()

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Send ``sig`` and wait for the exit status (the server is killed if it takes minutes)."""
        assert self.server is not None, "not started"
        return self.server.stop(sig, _STOP_TIMEOUT_S)

    def kill(self) -> None:
        if self.server is not None:
            self.server.kill()

    def worker_pids(self) -> list[int]:
        """The worker processes (none when the server is one process)."""
        return _children(self.pid) if self.workers > 1 else []

    def worker_pid(self, index: str) -> int:
        """The process of worker ``index`` now (the supervisor logs each start with its pid)."""
        started = [e for e in self.events("worker started") if str(e.get("worker")) == index]
        if not started:
            raise LookupError(f"no worker {index} has started")
        return int(started[-1]["pid"])

    def per_worker(self, name: str) -> dict[str, float]:
        """The /metrics samples called ``name``, summed per ``worker`` label (a supervisor's page)."""
        sums: dict[str, float] = {}
        for (sample, labels), value in scrape(self.metrics_url).items():
            worker = dict(labels).get("worker")
            if sample == name and worker is not None:
                sums[worker] = sums.get(worker, 0.0) + value
        return sums

    def rss_mb(self) -> float:
        """Resident memory of the main process and its workers."""
        return sum(_rss_mb(pid) for pid in [self.pid, *self.worker_pids()])

    def events(self, name: str) -> list[dict]:
        """The JSON log events called ``name`` of the current incarnation."""
        assert self.server is not None, "not started"
        return self.server.events_named(name)

    def sample(self, name: str, **labels: str) -> float:
        """The sum of the /metrics samples called ``name`` that have ``labels`` (and any others, such as
        a supervisor's ``worker`` label)."""
        wanted = set(labels.items())
        return sum(
            value
            for (sample, got), value in scrape(self.metrics_url).items()
            if sample == name and wanted <= set(got)
        )


def nginx_binary() -> str | None:
    """nginx's path (Debian puts it in /usr/sbin), or None."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/bin")


class Balanced:
    """nginx, configured from deploy/nginx's template, in front of two replicas, all on loopback."""

    def __init__(self, args: Sequence[str], nginx: str, *, startup_timeout: float = 300.0) -> None:
        self.replicas = [Service(args, startup_timeout=startup_timeout) for _ in range(2)]
        self.nginx = nginx
        self.port = _free_port()
        self._prefix = Path(tempfile.mkdtemp(prefix="faults-nginx-"))
        self._process: subprocess.Popen | None = None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> Balanced:
        try:
            with ThreadPoolExecutor(len(self.replicas)) as starting:  # both load their model at once
                list(starting.map(Service.start, self.replicas))
            self._start_nginx()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def rss_mb(self) -> float:
        return sum(replica.rss_mb() for replica in self.replicas if replica.server.process.poll() is None)

    @property
    def error_log(self) -> str:
        path = self._prefix / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def close(self) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(10)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait(10)
        for replica in self.replicas:
            replica.kill()
        shutil.rmtree(self._prefix, ignore_errors=True)

    def _start_nginx(self) -> None:
        spec = importlib.util.spec_from_file_location("render_conf", _NGINX_TEMPLATE)  # deploy/ is no package
        render = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(render)
        (self._prefix / "tmp").mkdir()
        config = self._prefix / "nginx.conf"
        backends = [replica.target for replica in self.replicas]
        config.write_text(render.render_for_prefix(self._prefix, listen=self.target, backends=backends))
        argv = [
            self.nginx,
            "-p",
            str(self._prefix),
            "-c",
            str(config),
            "-e",
            str(self._prefix / "error.log"),
            "-g",
            "daemon off;",
        ]
        self._process = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 30
        with grpc.insecure_channel(self.target) as channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline and self._process.poll() is None:
                with contextlib.suppress(grpc.RpcError):
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=2)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return
                time.sleep(0.1)
        raise RuntimeError(f"nginx did not pass calls on within 30 s:\n{self.error_log[-2000:]}")
