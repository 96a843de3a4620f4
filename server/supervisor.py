"""Several cbam-serve processes on one port (``workers`` above 1), and the process that keeps them.

    cbam-serve --workers 2
      supervisor (this module: no torch, no gRPC server)     holds the port, serves /metrics
        worker 0   python -m server.worker (server/worker.py)  a whole server: model replica, batcher,
        worker 1   ...                                         preprocess threads, share of the cores

Every worker listens on the same port (SO_REUSEPORT); the kernel hands each new *connection* to one of
them (by a hash of its addresses), and every call on a connection goes to the worker that accepted it.

- Start: the port and /metrics are bound here first (a port in use stops the start before any worker);
  worker 0 starts alone until its model is loaded, so a bad checkpoint, TLS file or device stops the
  start with one message; then the others. The supervisor logs "serving" once every worker is warm.
- Health: a check lands on whichever worker took its connection, so the supervisor tells every worker
  the group's state; each answers SERVING only while every worker is warm.
- A worker that dies is logged, counted (cbam_worker_restarts_total) and restarted after a backoff;
  more than ``_CRASHES_ALLOWED`` deaths of one worker within ``_CRASH_WINDOW_S`` stop the server
  (exit 1) instead of looping: the orchestrator restarting the whole server is the better remedy.
- SIGTERM/SIGINT: every worker drains at once (its own grace); then they close their ports one at a
  time (InferenceServer.stop says why), and the supervisor exits.
- A worker drains and exits when its socket to the supervisor breaks, so even SIGKILL of the
  supervisor leaves no orphans (and, unlike PR_SET_PDEATHSIG, this works on any POSIX system).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection

from server.config import Settings, usable_cores
from server.errors import StartupError
from server.metrics import MetricsEndpoint, SupervisorMetrics, WorkerExpositions

__all__ = [
    "CORES_PER_WORKER",
    "MAX_AUTO_WORKERS",
    "Close",
    "Closed",
    "Drained",
    "GroupState",
    "Loaded",
    "Supervisor",
    "Warm",
    "WorkerSpec",
    "WorkerState",
    "reserve_port",
    "supervise",
    "worker_count",
    "worker_settings",
]

_log = logging.getLogger(__name__)

EXIT_BAD_SETTINGS = 2  # what server.__main__ exits with on bad settings; a worker's StartupError too
_BACKOFF_FIRST_S = 0.25
_BACKOFF_MAX_S = 30.0
_CRASH_WINDOW_S = 60.0
_CRASHES_ALLOWED = 5  # deaths of one worker within the window; one more stops the server
_STOP_MARGIN_S = 15.0  # beyond a worker's own grace, before it is killed
CORES_PER_WORKER = 4  # workers=0 (auto): one per this many usable cores...
MAX_AUTO_WORKERS = 8  # ...and at most this many


# The messages between supervisor and workers, pickled over a socket pair (multiprocessing.connection).
@dataclass(frozen=True)
class WorkerSpec:
    """Supervisor -> worker, first: who it is and its settings (port resolved, threads shared out)."""

    index: int
    settings: Settings


@dataclass(frozen=True)
class Loaded:
    """Worker -> supervisor: model loaded and port bound; the other workers may start."""


@dataclass(frozen=True)
class Warm:
    """Worker -> supervisor: warmed up; its /metrics is on 127.0.0.1:metrics_port (None: off)."""

    metrics_port: int | None


@dataclass(frozen=True)
class Drained:
    """Worker -> supervisor, when stopping: everything it took is answered, its callers have gone
    quiet, and it holds what comes; ready to close its port."""


@dataclass(frozen=True)
class Close:
    """Supervisor -> one worker at a time, once every worker has drained: your turn to close."""


@dataclass(frozen=True)
class Closed:
    """Worker -> supervisor: its port is closed (GOAWAY sent); the next worker's turn."""


@dataclass(frozen=True)
class WorkerState:
    index: int
    pid: int
    ready: bool
    restarts: int


@dataclass(frozen=True)
class GroupState:
    """Supervisor -> every worker, on any change: SERVING only when every worker is warm."""

    serving: bool
    workers: tuple[WorkerState, ...]


def worker_count(settings: Settings) -> int:
    """``settings.workers``, or for 0 (auto) one worker per ``CORES_PER_WORKER`` usable cores, at least
    1 and at most ``MAX_AUTO_WORKERS``.

    One process cannot spend much more than one core on the work that holds its interpreter lock (the
    event loop and gRPC's Python side: much of the 0.6-1.1 ms of CPU per one-image call outside the
    forward, docs/PERFORMANCE.md section 5), so a worker per few cores keeps that from capping the
    server; fewer than 4 cores get one worker: two on a 2-core machine served the default model 1.19x
    faster when nothing else ran, but 0.51x-1.29x beside other work, with up to 37% more CPU per image
    (each batches half the calls); there the machine's owner knows best. The cap bounds the model replicas
    (and CUDA contexts) a large machine would otherwise get.
    """
    if settings.workers:
        return settings.workers
    return max(1, min(MAX_AUTO_WORKERS, usable_cores() // CORES_PER_WORKER))


def worker_settings(settings: Settings, count: int, port: int) -> Settings:
    """What each of ``count`` workers runs with: the shared ``port``, its share of the cores for
    torch and preprocessing (unless set), and its /metrics on loopback for the supervisor to read."""
    share = max(1, usable_cores() // count)
    return settings.model_copy(
        update={
            "port": port,
            "workers": 1,
            "torch_threads": settings.torch_threads or share,
            "preprocess_threads": settings.preprocess_threads or max(1, share // 2),
            "metrics": settings.metrics.model_copy(update={"host": "127.0.0.1", "port": 0}),
        }
    )


def reserve_port(host: str, port: int) -> tuple[list[socket.socket], int]:
    """Check that no other server listens on host:port (0 picks a free port), and hold it.

    The workers bind it with SO_REUSEPORT, which would also let them join an *independent* server that
    set SO_REUSEPORT (another supervised cbam-serve): so each address is first bound without it, which
    fails while anything else holds the port. Then a socket with SO_REUSEPORT (bound, never listening,
    so the kernel gives it no connections) keeps the port while workers start and restart, even while
    every worker is down. Only when the connections of an earlier server without SO_REUSEPORT still
    linger in TIME_WAIT does it need SO_REUSEADDR to bind; then, while every worker is down, a server
    with SO_REUSEADDR could take the port. Returns the held sockets (close them on exit) and the port.
    """
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError("host", f"cannot resolve {host!r}: {exc.strerror}") from None
    addresses = list(dict.fromkeys((family, sockaddr[0]) for family, _, _, _, sockaddr in infos))
    for _ in range(5 if port == 0 else 1):  # port 0: the first address's free port may be taken on another
        held: list[socket.socket] = []
        chosen = port
        try:
            for family, address in addresses:
                held.append(_hold(family, address, chosen))
                chosen = held[0].getsockname()[1]
            return held, chosen
        except OSError:
            for sock in held:
                sock.close()
    raise StartupError("port", f"cannot listen on {host}:{port} (in use, or not an address here)")


def _hold(family: int, address: str, port: int) -> socket.socket:
    def bound(port: int, *, reuse_addr: bool, reuse_port: bool) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # "::" takes IPv4 too, as gRPC's
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, int(reuse_addr))
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
            sock.bind((address, port))
        except OSError:
            sock.close()
            raise
        return sock

    # A given port is probed with SO_REUSEADDR, as gRPC's listeners bind, so lingering TIME_WAIT
    # connections pass; for port 0 without, so the kernel picks a port that has none.
    with bound(port, reuse_addr=port != 0, reuse_port=False) as probe:
        port = probe.getsockname()[1]
    try:
        return bound(port, reuse_addr=False, reuse_port=True)
    except OSError:
        return bound(port, reuse_addr=True, reuse_port=True)


@dataclass
class _Worker:
    index: int
    process: asyncio.subprocess.Process | None = None
    conn: Connection | None = None
    loaded: asyncio.Event = field(default_factory=asyncio.Event)
    ready: bool = False
    drained: bool = False
    closing: bool = False  # told it may close its port...
    closed: bool = False  # ...and it has
    metrics_port: int | None = None
    restarts: int = 0
    deaths: list[float] = field(default_factory=list)  # monotonic times, within the crash window

    @property
    def pid(self) -> int:
        return self.process.pid if self.process is not None and self.process.returncode is None else 0


class Supervisor:
    """Runs ``count`` workers of ``settings`` on one port until SIGTERM/SIGINT; ``run()`` returns the
    exit status."""

    def __init__(self, settings: Settings, count: int) -> None:
        if count < 2:
            raise ValueError(f"a supervisor runs 2 or more workers, got {count}")
        self.settings = settings
        self._workers = [_Worker(i) for i in range(count)]
        self._metrics = SupervisorMetrics()
        self._metrics.registry.register(WorkerExpositions(self._worker_endpoints))
        for worker in self._workers:  # zeros from the start, so rate() and alerts see every worker
            self._metrics.restarts.labels(str(worker.index))
        self._stop = asyncio.Event()
        self._stopping = False
        self._serving_once = False
        self._exit_code = 0
        self._spec_settings = settings  # until the port is known: see run()
        self.port: int | None = None
        self.metrics_port: int | None = None

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        held, self.port = reserve_port(self.settings.host, self.settings.port)
        endpoint = None
        try:
            m = self.settings.metrics
            if m.enabled:
                endpoint = MetricsEndpoint(self._metrics.registry, m.host, m.port)
                self.metrics_port = endpoint.port
            self._spec_settings = worker_settings(self.settings, len(self._workers), self.port)
            self._publish()
            first, *rest = self._workers
            keepers = [asyncio.create_task(self._keep(first))]
            await _first_of(first.loaded.wait(), self._stop.wait())
            if not self._stop.is_set():
                keepers += [asyncio.create_task(self._keep(worker)) for worker in rest]
                await self._stop.wait()
            await self._drain(keepers)
        finally:
            if endpoint is not None:
                endpoint.close()
            for sock in held:
                sock.close()
        _log.info("stopped", extra={"fields": {"exit_code": self._exit_code}})
        return self._exit_code

    async def _keep(self, worker: _Worker) -> None:
        """Run ``worker`` until the server stops, restarting it when it dies."""
        while True:
            await self._spawn(worker)
            assert worker.process is not None
            pid = worker.process.pid
            status = await worker.process.wait()
            self._forget(worker)
            if self._stopping:
                return
            fields = {"worker": worker.index, "pid": pid, **_describe_status(status)}
            if not self._serving_once:  # the start itself failed: stop rather than retry
                _log.error("worker failed to start", extra={"fields": fields})
                self._fail(EXIT_BAD_SETTINGS if status == EXIT_BAD_SETTINGS else 1)
                return
            now = time.monotonic()
            worker.deaths = [t for t in worker.deaths if now - t < _CRASH_WINDOW_S] + [now]
            if len(worker.deaths) > _CRASHES_ALLOWED:
                _log.error("worker crash loop: stopping the server", extra={"fields": {
                    **fields, "deaths": len(worker.deaths), "window_seconds": _CRASH_WINDOW_S}})  # fmt: skip
                self._fail(1)
                return
            delay = min(_BACKOFF_MAX_S, _BACKOFF_FIRST_S * 2 ** (len(worker.deaths) - 1))
            _log.error("worker died", extra={"fields": {**fields, "restart_in_seconds": delay}})
            worker.restarts += 1
            self._metrics.restarts.labels(str(worker.index)).inc()
            self._publish()
            try:
                await asyncio.wait_for(self._stop.wait(), delay)
                return
            except asyncio.TimeoutError:  # not yet the builtin TimeoutError on Python 3.10
                pass

    async def _spawn(self, worker: _Worker) -> None:
        ours, theirs = socket.socketpair()
        with theirs:
            worker.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "server.worker", str(theirs.fileno()), pass_fds=(theirs.fileno(),)
            )
        worker.conn = Connection(ours.detach())
        worker.loaded.clear()
        worker.drained = worker.closing = worker.closed = False
        worker.conn.send(WorkerSpec(worker.index, self._spec_settings))
        asyncio.get_running_loop().add_reader(worker.conn.fileno(), self._receive, worker)
        _log.info("worker started", extra={"fields": {"worker": worker.index, "pid": worker.process.pid}})
        self._publish()

    def _receive(self, worker: _Worker) -> None:
        conn = worker.conn
        assert conn is not None
        try:
            while conn.poll():
                message = conn.recv()
                if isinstance(message, Loaded):
                    worker.loaded.set()
                elif isinstance(message, Warm):
                    worker.ready, worker.metrics_port = True, message.metrics_port
                    self._publish()
                elif isinstance(message, Drained):
                    worker.drained = True
                    self._next_to_close()
                elif isinstance(message, Closed):
                    worker.closed = True
                    self._next_to_close()
        except (EOFError, OSError):  # it exited; _keep hears of it from wait()
            asyncio.get_running_loop().remove_reader(conn.fileno())

    def _forget(self, worker: _Worker) -> None:
        if worker.conn is not None:
            asyncio.get_running_loop().remove_reader(worker.conn.fileno())
            worker.conn.close()
            worker.conn = None
        worker.ready, worker.metrics_port = False, None
        self._publish()
        self._next_to_close()

    def _publish(self) -> None:
        """Tell every worker the group's state, and update the gauges (and, once, log "serving")."""
        serving = all(w.ready for w in self._workers)
        running = [w for w in self._workers if w.pid]
        states = {
            "serving": sum(w.ready for w in self._workers),
            "starting": sum(1 for w in running if not w.ready),
            "down": len(self._workers) - len(running),
        }
        for state, count in states.items():
            self._metrics.workers.labels(state).set(count)
        if serving and not self._serving_once and not self._stopping:
            self._serving_once = True
            s = self._spec_settings
            _log.info("serving", extra={"fields": {
                "port": self.port, "metrics_port": self.metrics_port, "workers": len(self._workers),
                "pids": [w.pid for w in self._workers], "torch_threads": s.torch_threads,
                "preprocess_threads": s.preprocess_threads}})  # fmt: skip
        group = GroupState(
            serving and not self._stopping,
            tuple(WorkerState(w.index, w.pid, w.ready, w.restarts) for w in self._workers),
        )
        for worker in running:
            if worker.conn is not None:
                with contextlib.suppress(OSError):  # it is exiting; _keep hears of it
                    worker.conn.send(group)

    def _next_to_close(self) -> None:
        """While stopping, once every running worker has drained: let them close their ports one at a
        time, the next when the last has closed (or exited). See InferenceServer.stop for why."""
        running = [w for w in self._workers if w.pid and w.conn is not None]
        if not self._stopping or not all(w.drained for w in running):
            return
        if any(w.closing and not w.closed for w in running):  # it says Closed, or exits
            return
        worker = next((w for w in running if not w.closing), None)
        if worker is not None:
            worker.closing = True
            with contextlib.suppress(OSError):
                worker.conn.send(Close())  # type: ignore[union-attr]

    def _fail(self, exit_code: int) -> None:
        self._exit_code = exit_code
        self._stop.set()

    async def _drain(self, keepers: Sequence[asyncio.Task[None]]) -> None:
        self._stopping = True
        grace = self.settings.grace_seconds + self.settings.drain_delay_seconds
        _log.info("draining", extra={"fields": {"grace_seconds": self.settings.grace_seconds}})
        for worker in self._workers:
            if worker.pid:
                worker.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        done, pending = await asyncio.wait(keepers, timeout=grace + _STOP_MARGIN_S)
        if pending:
            for worker in self._workers:
                if worker.pid:
                    _log.error("worker did not stop: killing it", extra={"fields": {"worker": worker.index}})
                    worker.process.kill()  # type: ignore[union-attr]
            await asyncio.wait(pending)
        for task in done:
            task.result()  # a bug in _keep surfaces here, not silently

    def _worker_endpoints(self) -> list[tuple[str, int]]:
        """(worker label, loopback metrics port) of every warm worker; called from the /metrics thread."""
        return [(str(w.index), w.metrics_port) for w in list(self._workers) if w.metrics_port]


def supervise(settings: Settings, count: int) -> int:
    """Run ``count`` workers until SIGTERM/SIGINT; the exit status. Raises StartupError when the port or
    metrics port cannot be had."""
    return asyncio.run(Supervisor(settings, count).run())


async def _first_of(*awaitables) -> None:
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


def _describe_status(status: int) -> dict[str, object]:
    if status < 0:
        return {"signal": signal.Signals(-status).name}
    return {"exit_code": status}
