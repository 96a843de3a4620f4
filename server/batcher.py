"""Dynamic batching with the semantics of Triton's dynamic batcher. Knows nothing about images.

Callers ``submit()`` items and await their own futures. One loop forms batches: it takes queued items
up to ``max_batch_size`` units, waiting at most ``max_batch_delay_s`` after the oldest one arrived for
more to come, drops the items whose deadline passed or whose caller went away, and awaits
``run_batch`` on the rest. While a batch runs (``run_batch`` should hand the work to a thread), new
items keep queueing, so the next batch is formed by the time the current one ends.

An item is one unit (an image) unless the batcher is given ``size``: then an item may hold several
(a request's whole tensor), batches and the queue bound count units, and an item larger than the room
left in a batch is ``split`` there: its first part joins this batch, the rest stays first in line for
the next, and the outputs of its parts are ``join``-ed, in order, into its one result.
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
    """One item's result, and how its batches went."""

    value: Out
    queue_seconds: float  # from submit() to the start of its (first) batch
    inference_seconds: float  # run_batch of its whole batch (of each batch it was split over, summed)
    batch_size: int  # units in its batch (the largest, when it was split over several)


class _Pending(Generic[In, Out]):
    """A submitted item: what of it is still queued, and the outputs of the parts already taken."""

    __slots__ = (
        "item", "size", "deadline", "future", "enqueued_at", "span", "reason",
        "outputs", "taken", "started", "inference_seconds", "batch_size",
    )  # fmt: skip

    def __init__(
        self,
        item: In,
        size: int,
        deadline: float | None,
        future: asyncio.Future[Batched[Out]],
        span: object = None,
    ) -> None:
        self.item = item  # the part not yet taken by a batch
        self.size = size  # its units
        self.deadline = deadline
        self.future = future
        self.enqueued_at = time.monotonic()
        self.span = span  # with tracing on: the span of the request it belongs to
        self.reason: str | None = None  # why it was dropped, once it was
        self.outputs: list[Out] = []  # of the parts computed, in order
        self.taken = 0  # parts in a batch and not yet answered
        self.started: float | None = None  # its first batch's start
        self.inference_seconds = 0.0
        self.batch_size = 0

    def drop_reason(self, now: float) -> str | None:
        """Why this item should not be computed, or None if it still should."""
        if self.reason is None:
            if self.deadline is not None and now >= self.deadline:
                self.reason = "deadline"
            elif self.future.done():  # its caller was cancelled (went away, or gRPC hit the deadline)
                self.reason = "cancelled"
        return self.reason


class DynamicBatcher(Generic[In, Out]):
    """Groups concurrently submitted items into batches for ``run_batch``.

    ``run_batch(items)`` must return one output per item, in order; any exception it raises fails
    that batch's items only. Deadlines are ``time.monotonic()`` values. ``size(item)`` (default: 1)
    counts an item's units; ``split(item, n)`` returns its first ``n`` units and the rest as two
    items, ``join(outputs)`` one output from its parts' (both needed with ``size``). With ``tracing``
    on, each item keeps its submitter's span, and each batch is traced with links to them
    (server/tracing.py).
    """

    def __init__(
        self,
        run_batch: Callable[[list[In]], Awaitable[list[Out]]],
        *,
        max_batch_size: int,
        max_batch_delay_s: float,
        max_queue: int,
        metrics: ServerMetrics | None = None,
        size: Callable[[In], int] | None = None,
        split: Callable[[In, int], tuple[In, In]] | None = None,
        join: Callable[[list[Out]], Out] | None = None,
        tracing: Tracing = Tracing.OFF,
    ) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if max_batch_delay_s < 0:
            raise ValueError(f"max_batch_delay_s must be >= 0, got {max_batch_delay_s!r}")
        if not isinstance(max_queue, int) or max_queue < 1:
            raise ValueError(f"max_queue must be an integer >= 1, got {max_queue!r}")
        if size is not None and (split is None or join is None):
            raise ValueError("items with a size need split and join too: a large one is split over batches")
        self.max_batch_size = max_batch_size
        self.max_batch_delay_s = max_batch_delay_s
        self.max_queue = max_queue
        self._run_batch = run_batch
        self._size = size
        self._split = split
        self._join = join
        self._metrics = metrics if metrics is not None else ServerMetrics()
        self._tracing = tracing
        self._queue_stage = self._metrics.stage_seconds.labels("queue")
        self._inference_stage = self._metrics.stage_seconds.labels("inference")
        self._queue: collections.deque[_Pending[In, Out]] = collections.deque()
        self._queued = 0  # units waiting
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    @property
    def depth(self) -> int:
        """Units (images) waiting for a batch."""
        return self._queued

    def start(self) -> None:
        """Start forming batches (on the running event loop)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._serve_batches(), name="batcher")

    def check_room(self, items: int = 1) -> None:
        """Raise Overloaded (or ShuttingDown) now if ``items`` units submitted now would be refused."""
        if self._closing:
            raise ShuttingDown("the server is shutting down")
        if self._queued + items > self.max_queue:
            self._prune()
            if self._queued + items > self.max_queue:
                self._metrics.dropped.labels("overloaded").inc(items)
                if items == 1:
                    raise Overloaded(f"batch queue is full: {self.max_queue} requests already waiting")
                raise Overloaded(
                    f"batch queue has room for {self.max_queue - self._queued} of these {items} images "
                    f"({self._queued} of {self.max_queue} places taken); none was queued"
                )

    async def submit(self, item: In, deadline: float | None = None) -> Batched[Out]:
        """Queue one item and wait for its result. Never blocks on a full queue: raises Overloaded."""
        return await self.submit_many([item], deadline)[0]

    def submit_many(
        self, items: list[In], deadline: float | None = None
    ) -> list[asyncio.Future[Batched[Out]]]:
        """Queue ``items`` together (all or, raising Overloaded, none) and return their futures, in order.

        Each item is batched as if it came alone; cancelling a future drops its item."""
        sizes = [1] * len(items) if self._size is None else [self._size(item) for item in items]
        self.check_room(sum(sizes))
        loop = asyncio.get_running_loop()
        span = self._tracing.current_span() if self._tracing.enabled else None
        pendings = [
            _Pending(item, size, deadline, loop.create_future(), span)
            for item, size in zip(items, sizes, strict=True)
        ]
        self._queue.extend(pendings)
        self._queued += sum(sizes)
        self._metrics.queue_depth.set(self._queued)
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
            for pending, _, _ in batch:
                self._queue_stage.observe(started - pending.enqueued_at)
            try:
                outputs = await self._run_batch([part for _, part, _ in batch])
                if len(outputs) != len(batch):
                    raise RuntimeError(f"run_batch returned {len(outputs)} results for {len(batch)} items")
            except Exception as exc:  # a failed batch fails its own items only, and says why
                units = sum(size for _, _, size in batch)
                _log.error("batch failed", extra={"fields": {"batch_size": units, "error": repr(exc)}})
                if self._tracing.enabled:
                    self._trace(batch, started, failed=True)
                for pending, _, _ in batch:
                    self._fail(pending, exc)
                continue
            inference_seconds = time.monotonic() - started
            units = sum(size for _, _, size in batch)
            self._inference_stage.observe(inference_seconds)
            if self._tracing.enabled:
                self._trace(batch, started, failed=False, ended=started + inference_seconds)
            self._metrics.batch_size.observe(units)
            for (pending, _, _), output in zip(batch, outputs, strict=True):
                self._deliver(pending, output, started, inference_seconds, units)

    def _deliver(
        self, pending: _Pending[In, Out], output: Out, started: float, seconds: float, units: int
    ) -> None:
        pending.outputs.append(output)  # its parts run in order: one per batch, batches one at a time
        pending.taken -= 1
        pending.started = started if pending.started is None else pending.started
        pending.inference_seconds += seconds
        pending.batch_size = max(pending.batch_size, units)
        if pending.size or pending.taken or pending.future.done():
            return  # more of it to come (or nobody waits for it)
        parts = pending.outputs
        value = parts[0] if len(parts) == 1 else self._join(parts)  # type: ignore[misc]
        pending.future.set_result(
            Batched(
                value, pending.started - pending.enqueued_at, pending.inference_seconds, pending.batch_size
            )
        )

    def _trace(
        self,
        batch: list[tuple[_Pending[In, Out], In, int]],
        started: float,
        failed: bool,
        ended: float | None = None,
    ) -> None:
        members = [(p.span, p.enqueued_at) for p, _, _ in batch]
        self._tracing.batch(members, started, time.monotonic() if ended is None else ended, failed)

    def _fail(self, pending: _Pending[In, Out], exc: Exception) -> None:
        if not pending.future.done():
            pending.future.set_exception(exc)
        if pending.size:  # the rest of it is still queued: it goes too, without counting as dropped
            self._queue.remove(pending)
            self._queued -= pending.size
            pending.size = 0
            self._metrics.queue_depth.set(self._queued)

    async def _next_batch(self) -> list[tuple[_Pending[In, Out], In, int]]:
        """(pending, the part of it in this batch, that part's units) for each item of the next batch."""
        batch: list[tuple[_Pending[In, Out], In, int]] = []
        room = self.max_batch_size
        while not batch:
            if not self._queue:
                if self._closing:
                    return []
                self._arrived.clear()
                await self._arrived.wait()
            room -= self._take_live(batch, room)
        closes_at = batch[0][0].enqueued_at + self.max_batch_delay_s
        while room and not self._closing:
            if not self._queue:
                remaining = closes_at - time.monotonic()
                if remaining <= 0:
                    break
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), remaining)
                except TimeoutError:
                    break
            room -= self._take_live(batch, room)
        # A caller may have gone away while the batch was filling.
        now = time.monotonic()
        kept = []
        for pending, part, size in batch:
            if self._dropped(pending, now, size):
                pending.taken -= 1
            else:
                kept.append((pending, part, size))
        return kept

    def _take_live(self, batch: list[tuple[_Pending[In, Out], In, int]], room: int) -> int:
        """Move up to ``room`` units from the queue's front into ``batch``; the units taken."""
        taken = 0
        now = time.monotonic()
        while self._queue and taken < room:
            pending = self._queue[0]
            if self._dropped(pending, now, pending.size):
                self._queue.popleft()
                self._queued -= pending.size
                pending.size = 0
                continue
            if pending.size <= room - taken:  # all of it
                part, size = pending.item, pending.size
                self._queue.popleft()
            else:  # as much as fits; the rest stays first in line
                size = room - taken
                part, pending.item = self._split(pending.item, size)  # type: ignore[misc]
            pending.size -= size
            pending.taken += 1
            self._queued -= size
            taken += size
            batch.append((pending, part, size))
        self._metrics.queue_depth.set(self._queued)
        return taken

    def _prune(self) -> None:
        now = time.monotonic()
        kept: collections.deque[_Pending[In, Out]] = collections.deque()
        for pending in self._queue:
            if self._dropped(pending, now, pending.size):
                self._queued -= pending.size
                pending.size = 0
            else:
                kept.append(pending)
        self._queue = kept
        self._metrics.queue_depth.set(self._queued)

    def _dropped(self, pending: _Pending[In, Out], now: float, units: int) -> bool:
        """Whether ``units`` of ``pending`` are to be dropped (counted by reason; its caller told once)."""
        reason = pending.drop_reason(now)
        if reason is None:
            return False
        self._metrics.dropped.labels(reason).inc(units)
        if not pending.future.done():
            pending.future.set_exception(Expired("deadline passed while the request waited in the queue"))
        return True
