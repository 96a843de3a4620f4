"""Dynamic batching with the semantics of Triton's dynamic batcher. Knows nothing about images.

Callers ``submit()`` one item each and await their own future. One loop forms batches: it takes up
to ``max_batch_size`` queued items, waiting at most ``max_batch_delay_s`` after the oldest one
arrived for more to come, drops the items whose deadline passed or whose caller went away, and
awaits ``run_batch`` on the rest. While a batch runs (``run_batch`` should hand the work to a
thread), new items keep queueing, so the next batch is formed by the time the current one ends.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from server.errors import Expired, Overloaded, ShuttingDown
from server.metrics import ServerMetrics
from server.tracing import Tracing

__all__ = ["Batched", "DynamicBatcher"]

In = TypeVar("In")
Out = TypeVar("Out")

_log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Batched(Generic[Out]):
    """One item's result, and how its batch went."""

    value: Out
    queue_seconds: float  # from submit() to the start of its batch
    inference_seconds: float  # run_batch of its whole batch
    batch_size: int


class _Pending(Generic[In, Out]):
    __slots__ = ("item", "deadline", "future", "enqueued_at", "span")

    def __init__(
        self, item: In, deadline: float | None, future: asyncio.Future[Batched[Out]], span: object = None
    ) -> None:
        self.item = item
        self.deadline = deadline
        self.future = future
        self.enqueued_at = time.monotonic()
        self.span = span  # with tracing on: the span of the request it belongs to

    def drop_reason(self, now: float) -> str | None:
        """Why this item should not be computed, or None if it still should."""
        if self.deadline is not None and now >= self.deadline:
            return "deadline"
        if self.future.done():  # its caller was cancelled (went away, or gRPC hit the deadline)
            return "cancelled"
        return None


class DynamicBatcher(Generic[In, Out]):
    """Groups concurrently submitted items into batches for ``run_batch``.

    ``run_batch(items)`` must return one output per item, in order; any exception it raises fails
    that batch's items only. Deadlines are ``time.monotonic()`` values. With ``tracing`` on, each item
    keeps its submitter's span, and each batch is traced with links to them (server/tracing.py).
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Awaitable[list[Out]]],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        metrics: ServerMetrics | None = None,
        tracing: Tracing = Tracing.OFF,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, got {max_batch_delay_s!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self._run_batch = run_batch
        self._metrics = metrics if metrics is not None else ServerMetrics()
        self._tracing = tracing
        self._queue_stage = self._metrics.stage_seconds.labels("queue")
        self._inference_stage = self._metrics.stage_seconds.labels("inference")
        self._queue: collections.deque[_Pending[In, Out]] = collections.deque()
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Items waiting for a batch."""
        return len(self._queue)

    def start(self) -> None:
        """Start forming batches (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_batches(), name="batcher")

    def check_room(self, items: int = 1) -> None:
        """Raise Overloaded (or ShuttingDown) now if ``items`` submitted now would be refused."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if len(self._queue) + items > self.max_queue:
            self._prune()
            if len(self._queue) + items > self.max_queue:
                self._metrics.dropped.labels("overloaded").inc(items)
                if items == 1:
                    raise Overloaded(f"batch queue is full: {self.max_queue} requests already waiting")
                raise Overloaded(
                    f"batch queue has room for {self.max_queue - len(self._queue)} of these {items} images "
                    f"({len(self._queue)} of {self.max_queue} places taken); none was queued"
                )

    async def submit(self, item: In, deadline: float | None = None) -> Batched[Out]:
        """Queue one item and wait for its result. Never blocks on a full queue: raises Overloaded."""
        return await self.submit_many([item], deadline)[0]

    def submit_many(
        self, items: list[In], deadline: float | None = None
    ) -> list[asyncio.Future[Batched[Out]]]:
        """Queue ``items`` together (all or, raising Overloaded, none) and return their futures, in order.

        Each item is batched as if it came alone; cancelling a future drops its item."""
        self.check_room(len(items))
        loop = asyncio.get_running_loop()
        span = self._tracing.current_span() if self._tracing.enabled else None
        pendings = [_Pending(item, deadline, loop.create_future(), span) for item in items]
        self._queue.extend(pendings)
        self._metrics.queue_depth.set(len(self._queue))
        self._arrived.set()
        return [pending.future for pending in pendings]

    async def close(self) -> None:
        """Refuse new items, run the ones already queued, then stop."""
        self._closing = True
        self._arrived.set()
        if self._task is not None:
            await self._task

    async def _serve_batches(self) -> None:
        while True:
            batch = await self._next_batch()
            if not batch:
                if self._closing and not self._queue:  # closing and nothing left
                    return
                continue  # every item of the batch expired or was cancelled while it filled
            started = time.monotonic()
            for pending in batch:
                self._queue_stage.observe(started - pending.enqueued_at)
            try:
                outputs = await self._run_batch([p.item for p in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(batch)} items")
            except Exception as exc:  # a failed batch fails its own items only, and says why
                _log.error("batch failed", extra={"fields": {"batch_size": len(batch), "error": repr(exc)}})
                if self._tracing.enabled:
                    self._trace(batch, started, failed=True)
                for pending in batch:
                    if not pending.future.done():
                        pending.future.set_exception(exc)
                continue
            inference_seconds = time.monotonic() - started
            self._inference_stage.observe(inference_seconds)
            if self._tracing.enabled:
                self._trace(batch, started, failed=False, ended=started + inference_seconds)
            self._metrics.batch_size.observe(len(batch))
            for pending, output in zip(batch, outputs, strict=True):
                if not pending.future.done():
                    pending.future.set_result(
                        Batched(output, started - pending.enqueued_at, inference_seconds, len(batch))
                    )

    def _trace(
        self, batch: list[_Pending[In, Out]], started: float, failed: bool, ended: float | None = None
    ) -> None:
        members = [(p.span, p.enqueued_at) for p in batch]
        self._tracing.batch(members, started, time.monotonic() if ended is None else ended, failed)

    async def _next_batch(self) -> list[_Pending[In, Out]]:
        batch: list[_Pending[In, Out]] = []
        while not batch:
            if not self._queue:
                if self._closing:
                    return []
                self._arrived.clear()
                await self._arrived.wait()
            batch.extend(self._take_live(self.max_batch_size))
        closes_at = batch[0].enqueued_at + self.max_batch_delay_s
        while len(batch) < self.max_batch_size and not self._closing:
            if not self._queue:
                remaining = closes_at - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            batch.extend(self._take_live(self.max_batch_size - len(batch)))
        # A caller may have gone away while the batch was filling.
        now = time.monotonic()
        return [p for p in batch if not self._dropped(p, now)]

    def _take_live(self, limit: int) -> list[_Pending[In, Out]]:
        taken: list[_Pending[In, Out]] = []
        now = time.monotonic()
        while self._queue and len(taken) < limit:
            pending = self._queue.popleft()
            if not self._dropped(pending, now):
                taken.append(pending)
        self._metrics.queue_depth.set(len(self._queue))
        return taken

    def _prune(self) -> None:
        now = time.monotonic()
        self._queue = collections.deque(p for p in self._queue if not self._dropped(p, now))
        self._metrics.queue_depth.set(len(self._queue))

    def _dropped(self, pending: _Pending[In, Out], now: float) -> bool:
        reason = pending.drop_reason(now)
        if reason is None:
            return False
        self._metrics.dropped.labels(reason).inc()
        if not pending.future.done():
            pending.future.set_exception(Expired("deadline passed while the request waited in the queue"))
        return True
