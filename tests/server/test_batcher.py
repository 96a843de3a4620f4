"""DynamicBatcher: batches form up to max size within the delay, the queue is bounded, the dead are
dropped before compute, and a failed batch fails only itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.batcher import DynamicBatcher
from server.errors import Expired, Overloaded, ShuttingDown
from server.metrics import ServerMetrics


class Recorder:
    """A run_batch that records its batches, optionally blocking until released."""

    def __init__(self, *, blocked: bool = False, fail_on: int | None = None, short: bool = False) -> None:
        self.batches: list[list[int]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        if not blocked:
            self.release.set()
        self.fail_on = fail_on
        self.short = short

    async def __call__(self, items: list[int]) -> list[int]:
        self.batches.append(list(items))
        self.started.set()
        await self.release.wait()
        if self.fail_on is not None and self.fail_on in items:
            raise RuntimeError("boom")
        return [i * 10 for i in items][: -1 if self.short else None]


def make(run, **kwargs) -> tuple[DynamicBatcher, ServerMetrics]:
    metrics = ServerMetrics()
    options = {"max_batch_size": 4, "max_batch_delay_s": 0.05, "max_queue": 100, **kwargs}
    batcher = DynamicBatcher(run, metrics=metrics, **options)
    batcher.start()
    return batcher, metrics


async def computing_first(**kwargs) -> tuple[Recorder, DynamicBatcher, ServerMetrics, asyncio.Task]:
    """A batcher without batching delay whose first item, 0, is held computing in a blocked Recorder."""
    run = Recorder(blocked=True)
    batcher, metrics = make(run, max_batch_delay_s=0.0, **kwargs)
    computing = asyncio.create_task(batcher.submit(0))
    await run.started.wait()
    return run, batcher, metrics, computing


def sample(metrics: ServerMetrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def test_concurrent_items_share_batches_up_to_max() -> None:
    run = Recorder()
    batcher, metrics = make(run)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(10)))
    assert [r.value for r in results] == [i * 10 for i in range(10)]
    assert [len(b) for b in run.batches] == [4, 4, 2]
    assert [r.batch_size for r in results] == [4] * 8 + [2] * 2
    assert sample(metrics, "cbam_batch_size_count") == 3 and sample(metrics, "cbam_batch_size_sum") == 10
    assert sample(metrics, "cbam_stage_duration_seconds_count", stage="queue") == 10
    assert sample(metrics, "cbam_stage_duration_seconds_count", stage="inference") == 3
    await batcher.close()


async def test_a_lone_item_waits_at_most_the_delay() -> None:
    run = Recorder()
    batcher, _ = make(run, max_batch_delay_s=0.05)
    started = time.monotonic()
    result = await batcher.submit(1)
    waited = time.monotonic() - started
    # At least the delay, and not some other unit of it (a slow machine may add to the upper side).
    assert result.batch_size == 1 and 0.04 <= result.queue_seconds <= waited < 2.0
    await batcher.close()


async def test_the_next_batch_forms_while_one_computes() -> None:
    run, batcher, metrics, first = await computing_first(max_batch_size=8)
    later = [asyncio.create_task(batcher.submit(i)) for i in range(1, 6)]
    await asyncio.sleep(0.01)
    assert batcher.depth == 5 and sample(metrics, "cbam_queue_depth") == 5
    run.release.set()
    await asyncio.gather(first, *later)
    assert run.batches == [[0], [1, 2, 3, 4, 5]]
    assert sample(metrics, "cbam_queue_depth") == 0
    await batcher.close()


async def test_full_queue_is_refused_at_once() -> None:
    run, batcher, metrics, computing = await computing_first(max_batch_size=1, max_queue=2)
    queued = [asyncio.create_task(batcher.submit(i)) for i in (1, 2)]
    await asyncio.sleep(0)
    refused = batcher.submit(3)
    with pytest.raises(Overloaded, match="2 requests already waiting"):
        refused.send(None)  # raised by the coroutine's first step: the refusal waits for nothing
    assert sample(metrics, "cbam_dropped_requests_total", reason="overloaded") == 1
    run.release.set()
    await asyncio.gather(computing, *queued)
    await batcher.close()


async def test_expired_items_are_dropped_before_compute() -> None:
    run, batcher, metrics, computing = await computing_first(max_batch_size=4)
    doomed = asyncio.create_task(batcher.submit(1, deadline=time.monotonic() + 0.01))
    alive = asyncio.create_task(batcher.submit(2, deadline=time.monotonic() + 10))
    await asyncio.sleep(0.05)  # the first deadline passes while the item waits in the queue
    run.release.set()
    with pytest.raises(Expired):
        await doomed
    assert (await alive).value == 20
    await computing
    assert run.batches == [[0], [2]]
    assert sample(metrics, "cbam_dropped_requests_total", reason="deadline") == 1
    await batcher.close()


async def test_a_batch_whose_every_item_expires_while_it_fills_leaves_the_batcher_serving() -> None:
    """The batch closes empty (its only item's deadline passed during the delay); that is not the end."""
    run = Recorder()
    batcher, _ = make(run, max_batch_delay_s=0.2)
    with pytest.raises(Expired):
        await batcher.submit(0, deadline=time.monotonic() + 0.05)
    assert (await asyncio.wait_for(batcher.submit(1), timeout=5)).value == 10
    assert run.batches == [[1]]
    await batcher.close()


async def test_cancelled_callers_are_dropped_before_compute() -> None:
    run, batcher, metrics, computing = await computing_first(max_batch_size=4)
    gone = asyncio.create_task(batcher.submit(1))
    stays = asyncio.create_task(batcher.submit(2))
    await asyncio.sleep(0)
    gone.cancel()
    await asyncio.sleep(0)
    run.release.set()
    await asyncio.gather(computing, stays)
    assert run.batches == [[0], [2]]
    assert sample(metrics, "cbam_dropped_requests_total", reason="cancelled") == 1
    await batcher.close()


async def test_a_failed_batch_fails_only_its_items() -> None:
    run = Recorder(fail_on=1)
    batcher, _ = make(run, max_batch_size=2, max_batch_delay_s=0.01)
    results = await asyncio.gather(*(batcher.submit(i) for i in range(4)), return_exceptions=True)
    assert [type(r).__name__ for r in results[:2]] == ["RuntimeError", "RuntimeError"]
    assert [r.value for r in results[2:]] == [20, 30]
    await batcher.close()


async def test_wrong_number_of_results_fails_loudly() -> None:
    batcher, _ = make(Recorder(short=True), max_batch_size=2, max_batch_delay_s=0.01)
    results = await asyncio.gather(batcher.submit(1), batcher.submit(2), return_exceptions=True)
    assert all(isinstance(r, RuntimeError) and "1 results for 2 items" in str(r) for r in results)
    await batcher.close()


async def test_close_finishes_what_is_queued_and_refuses_new_items() -> None:
    run = Recorder(blocked=True)
    batcher, _ = make(run, max_batch_size=2, max_batch_delay_s=1.0)
    items = [asyncio.create_task(batcher.submit(i)) for i in range(5)]
    await run.started.wait()
    closing = asyncio.create_task(batcher.close())
    await asyncio.sleep(0)
    with pytest.raises(ShuttingDown):
        await batcher.submit(99)
    run.release.set()
    assert [r.value for r in await asyncio.gather(*items)] == [0, 10, 20, 30, 40]
    await closing


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
        ({"max_batch_delay_s": -1}, "max_batch_delay_s must be >= 0"),
        ({"max_queue": 0}, "max_queue must be an integer >= 1"),
    ],
)
def test_arguments_are_checked_up_front(kwargs: dict, message: str) -> None:
    options = {"max_batch_size": 1, "max_batch_delay_s": 0.0, "max_queue": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(Recorder(), **options)
