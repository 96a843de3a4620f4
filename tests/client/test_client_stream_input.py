"""classify_stream reads its input lazily, one image per free slot of the max_inflight window, so an
endless generator gets answers in constant memory: Client and AsyncClient, against a scripted server on
loopback that answers only once `max_inflight` requests are unanswered (so a client that keeps fewer in
flight would wait for ever, and the counts below show it never keeps more)."""

import asyncio
import itertools

import pytest

from client import AsyncClient, Client, RetryPolicy

ANSWERS, MAX_INFLIGHT = 40, 4


class Counts:
    """Images taken from the source, answers seen by the caller, and the most ever unanswered."""

    def __init__(self) -> None:
        self.taken = self.answered = self.most_unanswered = 0

    def answer(self) -> None:
        self.answered += 1
        self.most_unanswered = max(self.most_unanswered, self.taken - self.answered + 1)


def test_an_endless_generator_gets_answers_with_at_most_max_inflight_unanswered(scripted):
    servicer, address = scripted
    servicer.answer_in_groups_of = MAX_INFLIGHT
    counts = Counts()

    def endless():
        for _ in itertools.count():
            counts.taken += 1
            yield b"png"

    with Client(address) as client:
        stream = client.classify_stream(endless(), max_inflight=MAX_INFLIGHT, timeout=60)
        for result in stream:
            assert result.ok, result.error
            counts.answer()
            if counts.answered == ANSWERS:
                break
        stream.close()
    assert counts.answered == ANSWERS
    assert counts.most_unanswered <= MAX_INFLIGHT
    assert counts.taken <= ANSWERS + MAX_INFLIGHT


async def test_an_endless_async_generator_gets_answers_with_at_most_max_inflight_unanswered(scripted):
    servicer, address = scripted
    servicer.answer_in_groups_of = MAX_INFLIGHT
    counts = Counts()

    async def endless():
        for _ in itertools.count():
            await asyncio.sleep(0)  # an eager reader would spin here, and the wait_for below would end it
            counts.taken += 1
            yield b"png"

    async def take_answers(stream) -> None:
        async for result in stream:
            assert result.ok, result.error
            counts.answer()
            if counts.answered == ANSWERS:
                return

    async with AsyncClient(address) as client:
        stream = client.classify_stream(endless(), max_inflight=MAX_INFLIGHT, timeout=60)
        try:
            await asyncio.wait_for(take_answers(stream), timeout=60)
        finally:
            await stream.aclose()
    assert counts.answered == ANSWERS
    assert counts.most_unanswered <= MAX_INFLIGHT
    assert counts.taken <= ANSWERS + MAX_INFLIGHT


async def test_a_broken_stream_of_an_async_generator_resumes_without_losing_or_repeating(scripted):
    servicer, address = scripted
    servicer.break_stream_after = 3

    async def images():
        for _ in range(10):
            await asyncio.sleep(0)
            yield b"x"

    retry = RetryPolicy(initial_backoff_seconds=0.01, max_backoff_seconds=0.05)
    async with AsyncClient(address, retry=retry) as client:
        results = [r async for r in client.classify_stream(images(), max_inflight=2)]
    assert sorted(r.index for r in results) == list(range(10)) and all(r.ok for r in results)
    assert servicer.stream_calls == 2
    assert sorted(servicer.received_ids[3:]) == [str(i) for i in range(3, 10)]  # only the unanswered again


def test_an_input_that_raises_is_raised_to_the_caller_after_the_answers_owed(scripted):
    _, address = scripted

    def images():
        yield b"a"
        yield b"b"
        raise LookupError("the source broke")

    seen = []
    with Client(address) as client, pytest.raises(LookupError, match="the source broke"):
        for result in client.classify_stream(images()):
            seen.append(result.index)
    assert sorted(seen) == [0, 1]


async def test_an_async_input_that_raises_is_raised_to_the_caller_after_the_answers_owed(scripted):
    _, address = scripted

    async def images():
        yield b"a"
        yield b"b"
        raise LookupError("the source broke")

    seen = []
    async with AsyncClient(address) as client:
        with pytest.raises(LookupError, match="the source broke"):
            async for result in client.classify_stream(images()):
                seen.append(result.index)
    assert sorted(seen) == [0, 1]
