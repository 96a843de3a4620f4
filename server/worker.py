"""One worker of a supervised cbam-serve (server/supervisor.py): ``python -m server.worker FD``.

It reads its WorkerSpec from the supervisor's socket (file descriptor FD) and serves as a single
process does (server/app.py), on the port it shares with the other workers, except that:
  - its health turns SERVING only while the supervisor says every worker is warm;
  - GetModelInfo lists every worker, and which one answered;
  - its /metrics listens on loopback, for the supervisor to serve with the others';
  - it drains and exits when the supervisor's socket breaks: it never outlives its supervisor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

from cbam.v1 import inference_pb2 as pb
from server.app import InferenceServer, build_server
from server.errors import StartupError
from server.logs import configure_logging
from server.supervisor import (
    EXIT_BAD_SETTINGS,
    Close,
    Closed,
    Drained,
    GroupState,
    Loaded,
    Warm,
    WorkerSpec,
)

__all__ = ["main"]

_log = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    conn = Connection(int(argv[0]))
    spec: WorkerSpec = conn.recv()
    log = spec.settings.log
    configure_logging(log.level, log.json_, {"worker": spec.index})
    try:
        asyncio.run(_serve(spec, conn))
    except StartupError as exc:
        print(f"cbam-serve: {exc}", file=sys.stderr)
        return EXIT_BAD_SETTINGS
    return 0


def _exit(status: int) -> None:
    """Exit without the interpreter's teardown, as multiprocessing's children do: everything was
    closed in order already, and tearing down torch's modules took seconds of every drain (2-4 s
    here), during which the supervisor waited."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


async def _serve(spec: WorkerSpec, conn: Connection) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server, _ = build_server(spec.settings, share_port=True)
    server.model_info.worker = server.model_info.workers[0].index = spec.index
    link = _SupervisorLink(conn, server, stop)
    conn.send(Loaded())
    if stop.is_set():  # told to stop while loading: nothing was served
        return
    try:
        await server.start(serving=False)
        link.send(Warm(server.metrics_port))
    except BaseException:
        await server.stop(0)
        raise
    await stop.wait()
    await server.stop(close_turn=link.close_turn)


class _SupervisorLink:
    """The worker's end of its socket to the supervisor: group state in; EOF means the supervisor is
    gone, and the worker drains."""

    def __init__(self, conn: Connection, server: InferenceServer, stop: asyncio.Event) -> None:
        self._conn = conn
        self._server = server
        self._stop = stop
        self._health: asyncio.Task[None] | None = None  # the last health change, applied in order
        self._turn = asyncio.Event()  # this worker may close its port (or the supervisor is gone)
        asyncio.get_running_loop().add_reader(conn.fileno(), self._receive)

    @contextlib.asynccontextmanager
    async def close_turn(self, timeout: float) -> AsyncIterator[None]:
        """Say this worker is ready to close its port; wait (at most ``timeout``) for its turn, let it
        close, then pass the turn on."""
        self.send(Drained())
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._turn.wait(), timeout)
        yield
        self.send(Closed())

    def send(self, message: object) -> None:
        with contextlib.suppress(OSError):  # the supervisor is gone; _receive sees EOF and stops us
            self._conn.send(message)

    def _receive(self) -> None:
        try:
            while self._conn.poll():
                message = self._conn.recv()
                if isinstance(message, GroupState):
                    self._apply(message)
                elif isinstance(message, Close):
                    self._turn.set()
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            self._turn.set()
            if not self._stop.is_set():
                _log.warning("supervisor gone: draining", extra={"fields": {}})
                self._stop.set()

    def _apply(self, group: GroupState) -> None:
        info = self._server.model_info
        del info.workers[:]
        info.workers.extend(
            pb.WorkerInfo(index=w.index, pid=w.pid, ready=w.ready, restarts=w.restarts) for w in group.workers
        )
        previous = self._health

        async def apply() -> None:
            if previous is not None:
                await previous
            await self._server.set_serving(group.serving)

        self._health = asyncio.get_running_loop().create_task(apply())


if __name__ == "__main__":
    _exit(main())
