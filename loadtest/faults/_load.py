"""The steady load a fault is injected under: Classify after Classify through the project's AsyncClient,
half the callers with the client's default retries, half with none, every call in a Ledger."""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

import grpc
import numpy as np
from PIL import Image

from client import AsyncClient, CbamError, RetryPolicy

from ._outcomes import RETRIES_OFF, RETRIES_ON, Ledger

__all__ = ["CALL_TIMEOUT_S", "SteadyLoad", "picture_png"]

# Far beyond any batch or drain: a call that takes this long has hung, and counts as lost.
CALL_TIMEOUT_S = 60.0
# A caller whose call failed waits this long before its next one, so a server that refuses at once
# (or a port that is closed) is not hammered by a tight loop; with retries on the client backs off too.
_PAUSE_AFTER_FAILURE_S = 0.02
# Each client its own connection: gRPC would otherwise share one per address in the process.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def picture_png(height: int, width: int, seed: int = 0) -> bytes:
    """A PNG of random pixels at the model's input size."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


class SteadyLoad:
    """``callers`` callers with retries off and as many with the client's default RetryPolicy, one
    call after another, each population over ``connections`` connections to ``target``.

        async with SteadyLoad(target, image, ledger, callers=4) as load:
            await load.wait_for_ok(5, timeout=60)   # every population had 5 OK calls since now
        # leaving it stops the callers and waits for every call in flight to end
    """

    def __init__(
        self, target: str, image: bytes, ledger: Ledger, *, callers: int = 4, connections: int = 2
    ) -> None:
        if callers < 1 or connections < 1:
            raise ValueError(f"callers and connections should be >= 1, got {callers} and {connections}")
        self.target = target
        self.image = image
        self.ledger = ledger
        self.callers = callers
        self.connections = min(connections, callers)
        self._stop = asyncio.Event()
        self._clients: list[AsyncClient] = []
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> SteadyLoad:
        for population, retry in ((RETRIES_OFF, RetryPolicy.none()), (RETRIES_ON, RetryPolicy())):
            clients = [
                AsyncClient(self.target, timeout=CALL_TIMEOUT_S, retry=retry, options=_OWN_CONNECTION)
                for _ in range(self.connections)
            ]
            self._clients += clients
            self._tasks += [
                asyncio.create_task(self._caller(population, clients[i % len(clients)]))
                for i in range(self.callers)
            ]
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._stop.set()
        # Every call ends by its deadline (and the retries' backoff never passes it).
        _, late = await asyncio.wait(self._tasks, timeout=CALL_TIMEOUT_S + 30)
        for task in late:
            task.cancel()  # counted as no answer by the caller itself
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for client in self._clients:
            await client.close()

    async def wait_for_ok(self, count: int, timeout: float) -> bool:
        """Wait until each population has had ``count`` OK calls that started from now on; False when
        ``timeout`` passed first."""
        since = time.monotonic()
        deadline = since + timeout
        while time.monotonic() < deadline:
            counts = {population: 0 for population in (RETRIES_OFF, RETRIES_ON)}
            for record in reversed(self.ledger.records):
                if record.started < since:
                    break  # records are appended as calls end: roughly in time order
                if record.code == "OK" and record.population in counts:
                    counts[record.population] += 1
            if min(counts.values()) >= count:
                return True
            await asyncio.sleep(0.05)
        return False

    async def _caller(self, population: str, client: AsyncClient) -> None:
        while not self._stop.is_set():
            started = self.ledger.begin()
            try:
                await client.classify(self.image, top_k=1)
            except CbamError as exc:
                self.ledger.end(population, started, exc.code, exc.message)
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), _PAUSE_AFTER_FAILURE_S)
                continue
            except asyncio.CancelledError:
                self.ledger.end(population, started, None, "the call never ended")
                raise
            self.ledger.end(population, started, grpc.StatusCode.OK)
