"""Retries, deadlines, metadata and stream resumption, against the scripted server of conftest.py."""

import random
import time

import grpc
import pytest

from client import (
    AsyncClient,
    Client,
    DeadlineExceededError,
    InvalidArgumentError,
    OverloadedError,
    RetryPolicy,
    UnavailableError,
)

FAST = RetryPolicy(
    max_attempts=4, initial_backoff_seconds=0.01, max_backoff_seconds=0.05, rng=random.Random(0)
)


@pytest.mark.parametrize("code", [grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED])
def test_transient_failures_are_retried_until_success(scripted, code):
    servicer, address = scripted
    servicer.failures = [code, code]
    with Client(address, retry=FAST) as client:
        assert client.classify(b"png").top.name == "seven"
    assert servicer.calls == 3


def test_retries_stop_after_max_attempts_and_raise_the_last_error(scripted):
    servicer, address = scripted
    servicer.failures = [grpc.StatusCode.RESOURCE_EXHAUSTED] * 10
    with Client(address, retry=FAST) as client, pytest.raises(OverloadedError) as caught:
        client.classify(b"png")
    assert servicer.calls == FAST.max_attempts
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.message == "scripted RESOURCE_EXHAUSTED"


def test_invalid_argument_is_raised_at_once_with_code_and_message(scripted):
    servicer, address = scripted
    with Client(address, retry=FAST) as client, pytest.raises(InvalidArgumentError) as caught:
        client.classify(b"bad")
    assert servicer.calls == 1
    assert caught.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert caught.value.message == "image: cannot decode 3 bytes"
    assert "INVALID_ARGUMENT" in str(caught.value)


def test_no_retry_waits_past_the_deadline(scripted):
    servicer, address = scripted
    servicer.failures = [grpc.StatusCode.UNAVAILABLE] * 100
    slow = RetryPolicy(max_attempts=100, initial_backoff_seconds=0.8, jitter=0.0)
    started = time.monotonic()
    with Client(address, retry=slow, timeout=2.0) as client, pytest.raises(UnavailableError):
        client.classify(b"png")
    assert time.monotonic() - started < 2.0
    assert servicer.calls == 2  # 0 s, then after 0.8 s; the next wait (1.6 s) would pass the deadline


def test_unreachable_target_retries_then_raises_unavailable():
    with (
        socket_port() as port,
        Client(f"127.0.0.1:{port}", retry=FAST) as client,
        pytest.raises(UnavailableError) as caught,
    ):
        client.health()
    assert caught.value.code == grpc.StatusCode.UNAVAILABLE


def test_bearer_token_goes_with_every_call(scripted):
    servicer, address = scripted
    with Client(address, token="s3cret") as client:
        client.classify(b"png")
        client.model_info()
    assert [m["authorization"] for m in servicer.metadata] == ["Bearer s3cret"] * 2


def test_stream_reports_bad_items_and_goes_on(scripted):
    servicer, address = scripted
    with Client(address) as client:
        stream = client.classify_stream([b"a", b"bad", b"c", "/no/such/file.png"])
        results = sorted(stream, key=lambda r: r.index)
    assert [r.ok for r in results] == [True, False, True, False]
    assert isinstance(results[1].error, InvalidArgumentError) and results[1].error.message == "bad image"
    assert "No such file" in results[3].error.message
    assert servicer.received_ids == ["0", "1", "2"]  # the unreadable file never went on the wire
    with Client(address) as client:
        with pytest.raises(InvalidArgumentError):
            client.classify_many([b"a", b"bad"])
        many = client.classify_many([b"a", b"bad"], return_exceptions=True)
    assert many[0].top.name == "seven" and isinstance(many[1], InvalidArgumentError)


def test_broken_stream_resumes_with_only_the_unanswered_images(scripted):
    servicer, address = scripted
    servicer.break_stream_after = 3
    with Client(address, retry=FAST) as client:
        results = list(client.classify_stream([b"x"] * 10, max_inflight=2))
    assert sorted(r.index for r in results) == list(range(10))
    assert all(r.ok for r in results)
    assert servicer.stream_calls == 2
    assert servicer.received_ids[:3] == ["0", "1", "2"]
    assert sorted(servicer.received_ids[3:]) == [str(i) for i in range(3, 10)]


def test_stream_deadline_surfaces_as_deadline_exceeded(scripted):
    _, address = scripted

    def slow_images():
        yield b"a"
        time.sleep(1.0)
        yield b"b"

    with Client(address) as client, pytest.raises(DeadlineExceededError):
        list(client.classify_stream(slow_images(), timeout=0.3))


async def test_async_client_retries_and_streams(scripted):
    servicer, address = scripted
    servicer.failures = [grpc.StatusCode.UNAVAILABLE]
    async with AsyncClient(address, retry=FAST) as client:
        assert (await client.classify(b"png")).top.index == 7
        with pytest.raises(InvalidArgumentError):
            await client.classify(b"bad")
        results = [r async for r in client.classify_stream([b"a", b"bad", b"c"])]
        info = await client.model_info()
    assert servicer.calls == 5  # 2 for the retried call, 1 rejected, 1 stream, 1 info
    assert sorted((r.index, r.ok) for r in results) == [(0, True), (1, False), (2, True)]
    assert info.arch == "scripted"


async def test_async_broken_stream_resumes(scripted):
    servicer, address = scripted
    servicer.break_stream_after = 2
    async with AsyncClient(address, retry=FAST) as client:
        predictions = await client.classify_many([b"x"] * 6, max_inflight=3)
    assert len(predictions) == 6 and servicer.stream_calls == 2


class socket_port:
    """A loopback port with nothing listening on it (bound, never listened, then released on exit)."""

    def __enter__(self) -> int:
        import socket

        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        return self._socket.getsockname()[1]

    def __exit__(self, *exc_info) -> None:
        self._socket.close()
