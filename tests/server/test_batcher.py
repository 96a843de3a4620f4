"""DynamicBatcher: batches form up to max size within the delay, the queue is bounded, the dead are
dropped before compute, and a failed batch fails only itself."""

from __future__ import annotations

import asyncio
import time

import pytest

from server.batcher import DynamicBatcher
from server.errors import Expired, Overloaded, ShuttingDown
from server.metrics import ServerMetrics
from tests.support import eventually


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


class Chunks:
    """A run_batch over chunks (lists of ints: several units per item), optionally blocking or failing."""

    def __init__(self, *, blocked: bool = False, fail: bool = False) -> None:
        self.batches: list[list[list[int]]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        if not blocked:
            self.release.set()
        self.fail = fail

    async def __call__(self, items: list[list[int]]) -> list[list[int]]:
        self.batches.append([list(item) for item in items])
        self.started.set()
        await self.release.wait()
        if self.fail:
            self.fail = False
            raise RuntimeError("boom")
        return [[i * 10 for i in item] for item in items]


def make_chunked(run, **kwargs) -> tuple[DynamicBatcher, ServerMetrics]:
    split = lambda item, n: (item[:n], item[n:])  # noqa: E731
    join = lambda outputs: [i for output in outputs for i in output]  # noqa: E731
    return make(run, size=len, split=split, join=join, **kwargs)


async def test_items_of_several_units_fill_batches_and_a_large_one_is_split_in_order() -> None:
    run = Chunks(blocked=True)
    batcher, metrics = make_chunked(run, max_batch_size=4, max_batch_delay_s=0.0)
    first = asyncio.create_task(batcher.submit([0]))
    await run.started.wait()
    large = asyncio.create_task(batcher.submit(list(range(1, 11))))  # ten units: split over three batches
    small = asyncio.create_task(batcher.submit([11, 12]))
    await asyncio.sleep(0)
    assert batcher.depth == 12 and sample(metrics, "cbam_queue_depth") == 12
    run.release.set()
    done, rest = await large, await small
    assert run.batches == [[[0]], [[1, 2, 3, 4]], [[5, 6, 7, 8]], [[9, 10], [11, 12]]]
    assert done.value == [i * 10 for i in range(1, 11)] and rest.value == [110, 120]
    assert done.batch_size == 4 and rest.batch_size == 4
    assert sample(metrics, "cbam_batch_size_count") == 4 and sample(metrics, "cbam_batch_size_sum") == 13
    assert sample(metrics, "cbam_stage_duration_seconds_count", stage="queue") == 5  # one per part
    await first
    await batcher.close()


async def test_the_queue_bound_counts_units() -> None:
    run = Chunks(blocked=True)
    batcher, metrics = make_chunked(run, max_batch_size=1, max_queue=5, max_batch_delay_s=0.0)
    computing = asyncio.create_task(batcher.submit([0]))
    await run.started.wait()
    queued = asyncio.create_task(batcher.submit([1, 2, 3, 4]))
    await asyncio.sleep(0)
    with pytest.raises(Overloaded, match="room for 1 of these 2 images"):
        await batcher.submit([5, 6])
    assert sample(metrics, "cbam_dropped_requests_total", reason="overloaded") == 2
    run.release.set()
    assert (await queued).value == [10, 20, 30, 40]
    await computing
    await batcher.close()


async def test_the_rest_of_a_split_item_is_dropped_when_its_deadline_passes() -> None:
    run = Chunks(blocked=True)
    batcher, metrics = make_chunked(run, max_batch_size=4, max_batch_delay_s=0.0)
    deadline = time.monotonic() + 0.05
    doomed = asyncio.create_task(batcher.submit(list(range(6)), deadline=deadline))
    await run.started.wait()  # its first four units compute while the deadline passes
    await eventually(lambda: time.monotonic() > deadline, what="the deadline to pass")
    after = asyncio.create_task(batcher.submit([7]))
    run.release.set()
    with pytest.raises(Expired):
        await doomed
    assert (await after).value == [70]
    assert run.batches == [[[0, 1, 2, 3]], [[7]]]
    assert sample(metrics, "cbam_dropped_requests_total", reason="deadline") == 2
    await batcher.close()


async def test_a_failed_part_fails_its_item_and_drops_the_rest_of_it() -> None:
    run = Chunks(blocked=True, fail=True)
    batcher, metrics = make_chunked(run, max_batch_size=4, max_batch_delay_s=0.0)
    failing = asyncio.create_task(batcher.submit(list(range(6))))
    await run.started.wait()
    after = asyncio.create_task(batcher.submit([7]))
    await asyncio.sleep(0)
    run.release.set()
    with pytest.raises(RuntimeError, match="boom"):
        await failing
    assert (await after).value == [70]
    assert run.batches == [[[0, 1, 2, 3]], [[7]]] and batcher.depth == 0
    assert sample(metrics, "cbam_dropped_requests_total", reason="cancelled") == 0
    await batcher.close()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": 0}, "max_batch_size must be an integer >= 1"),
        ({"max_batch_delay_s": -1}, "max_batch_delay_s must be >= 0"),
        ({"max_queue": 0}, "max_queue must be an integer >= 1"),
        ({"size": len}, "items with a size need split and join too"),
    ],
)
def test_arguments_are_checked_up_front(kwargs: dict, message: str) -> None:
    options = {"max_batch_size": 1, "max_batch_delay_s": 0.0, "max_queue": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        DynamicBatcher(Recorder(), **options)
