"""Faults from outside: clients that go away, clients that read slowly, bursts far above capacity.

Each time the server answers what it can, refuses the rest at once with a clear status, keeps its
queue and memory bounded, leaves nothing behind, and stays SERVING.
"""

from __future__ import annotations

import asyncio
import collections
import os
import threading
import time

import grpc
import pytest

from cbam.v1 import inference_pb2 as pb
from server.launcher import ServerProcess, metric, scrape
from server.metrics import LATENCY_BUCKETS
from tests.reliability import corpus
from tests.reliability.probes import CHANNEL_OPTIONS, health_status, stub_for
from tests.support import eventually, steady

pytestmark = pytest.mark.timeout(400)

IMAGE = corpus.encode(corpus.picture(32, 32, seed=2))


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _settled(server, name: str, want: float, **labels: str) -> None:
    """Wait for a metric to reach ``want`` (bookkeeping after a cancellation is asynchronous)."""
    await eventually(lambda: metric(server.metrics_url, name, **labels) == want, what=f"{name} == {want}")


async def _still_fine(server) -> None:
    assert health_status(server.address) == "SERVING"
    async with grpc.aio.insecure_channel(server.address) as channel:
        response = await stub_for(channel).Classify(pb.ClassifyRequest(encoded=IMAGE, top_k=1), timeout=30)
    assert len(response.labels) == 1
    assert not server.events_named("request failed")


# -- clients that go away ------------------------------------------------------------------------------


async def test_a_client_that_disconnects_mid_stream_leaves_nothing_behind(server):
    never = asyncio.Event()

    async def requests():
        for i in range(40):
            yield pb.ClassifyRequest(request_id=f"r{i}", encoded=IMAGE)
        await never.wait()

    channel = grpc.aio.insecure_channel(server.address)
    call = stub_for(channel).ClassifyStream(requests())
    await call.read()  # the server is working on the stream
    await channel.close()  # the whole connection goes, not just the call
    await _settled(server, "cbam_inflight_requests", 0)
    await _settled(server, "cbam_queue_depth", 0)
    await _still_fine(server)


async def test_unary_callers_that_give_up_are_dropped_not_computed(server):
    before = scrape(server.metrics_url)
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = stub_for(channel)
        calls = [stub.Classify(pb.ClassifyRequest(encoded=IMAGE), timeout=0.002) for _ in range(60)]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
    codes = {o.code() if isinstance(o, grpc.aio.AioRpcError) else grpc.StatusCode.OK for o in outcomes}
    assert codes <= {grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
    assert grpc.StatusCode.DEADLINE_EXCEEDED in codes
    await _settled(server, "cbam_inflight_requests", 0)
    after = scrape(server.metrics_url)
    computed = after.value("cbam_batch_size_sum") - before.value("cbam_batch_size_sum")
    assert computed < 60, "every expired request was computed anyway"
    await _still_fine(server)


@pytest.mark.slow
async def test_a_slow_reader_cannot_make_the_server_buffer_answers_without_bound(server):
    """A client that sends many items and reads none: once HTTP/2 windows and socket buffers are full
    (a few MB), the server must stop reading its requests instead of computing every item and
    queueing the answers in memory. So the count of answers computed stops growing."""
    sent = 0
    total = 20_000
    attention = pb.AttentionRequest(kind=pb.ATTENTION_KIND_BOTH, format=pb.ATTENTION_FORMAT_FLOAT16)

    async def requests():
        nonlocal sent
        for i in range(total):
            sent += 1
            yield pb.ClassifyRequest(request_id=f"s{i}", encoded=IMAGE, attention=attention)

    def answered() -> float:
        return metric(server.metrics_url, "cbam_requests_total", method="ClassifyStream", code="OK") - before

    before = 0.0
    before = answered()
    rss_before = rss_mb(server.pid)
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        call = stub_for(channel).ClassifyStream(requests())
        # No reads at all meanwhile. However slow the machine, the count must stop growing (3 s
        # without a new answer), and where it stops must be a bound far below what was offered.
        began = time.monotonic()
        stopped_at = await steady(answered, what="the answers to a stream nobody reads", timeout_s=180)
        waited = time.monotonic() - began
        rss_after = rss_mb(server.pid)
        size = (await call.read()).ByteSize()
        call.cancel()
    print(f"slow reader: client sent {sent} of {total}; server answered {stopped_at:.0f}, then no more "
          f"(steady after {waited:.0f} s; {stopped_at * size / 2**20:.1f} MB of answers); "
          f"RSS {rss_before:.0f} -> {rss_after:.0f} MB")  # fmt: skip
    assert sent < total, "the client could send everything: nothing pushed back"
    assert stopped_at * size < 32 * 2**20, "the server keeps computing answers nobody reads"
    assert rss_after - rss_before < 150
    await _settled(server, "cbam_inflight_requests", 0)
    await _still_fine(server)


# -- bursts --------------------------------------------------------------------------------------------

BURST = 300
MAX_QUEUE = 4


@pytest.fixture(scope="module")
def slow_server():
    """A model slow enough on two cores (CBAM-ResNet-18 at 224 x 224, ~0.3 s an image) to be swamped."""
    with ServerProcess(
        "--arch", "cbam_resnet18", "--model.num_classes", "10", "--batching.max_batch_size", "2",
        "--batching.max_queue", str(MAX_QUEUE), "--batching.max_batch_delay_ms", "5", "--log.level", "INFO",
    ) as s:  # fmt: skip
        yield s


def _refused(code: grpc.StatusCode, message: str) -> bool:
    """RESOURCE_EXHAUSTED from the server, or a stream refused by HTTP/2 (REFUSED_STREAM, code 7).

    A client may open more streams than a connection's max_concurrent_streams for a moment (the
    count races with streams closing); gRPC core then refuses them before any handler runs, which
    the client sees as UNAVAILABLE. Never processed, safe to retry, answered at once: backpressure too.
    """
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return True
    return code is grpc.StatusCode.UNAVAILABLE and "RST_STREAM with error code 7" in message


def _p90(values: list[float]) -> float:
    return values[int(0.9 * (len(values) - 1))] if values else 0.0


@pytest.mark.slow
async def test_a_burst_far_above_capacity_is_refused_at_once_with_bounded_queue_and_memory(slow_server):
    server = slow_server
    depths: list[float] = []
    stop = threading.Event()

    def watch_queue():
        while not stop.is_set():
            depths.append(metric(server.metrics_url, "cbam_queue_depth"))
            time.sleep(0.02)

    rss_before = rss_mb(server.pid)
    before = scrape(server.metrics_url)
    watcher = threading.Thread(target=watch_queue, daemon=True)
    watcher.start()

    async def one(stub):
        started = time.monotonic()
        try:
            await stub.Classify(pb.ClassifyRequest(encoded=IMAGE), timeout=240)
            return grpc.StatusCode.OK, time.monotonic() - started, ""
        except grpc.aio.AioRpcError as exc:
            return exc.code(), time.monotonic() - started, exc.details()

    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = stub_for(channel)
            await channel.channel_ready()
            outcomes = await asyncio.gather(*(one(stub) for _ in range(BURST)))
    finally:
        stop.set()
        watcher.join()
    rss_after = rss_mb(server.pid)

    ok = sorted(t for code, t, _ in outcomes if code is grpc.StatusCode.OK)
    refused = sorted(t for code, t, msg in outcomes if _refused(code, msg))
    other = [(code.name, msg) for code, _, msg in outcomes if code is not grpc.StatusCode.OK
             and not _refused(code, msg)]  # fmt: skip
    exhausted = sum(code is grpc.StatusCode.RESOURCE_EXHAUSTED for code, _, _ in outcomes)
    print(f"burst of {BURST}: {len(ok)} answered ({ok[0] if ok else 0:.2f}..{ok[-1] if ok else 0:.2f} s), "
          f"{len(refused)} refused ({exhausted} RESOURCE_EXHAUSTED, "
          f"{len(refused) - exhausted} REFUSED_STREAM; "
          f"median {refused[len(refused) // 2] if refused else 0:.3f} s, 90th {_p90(refused):.3f} s), "
          f"queue depth max {max(depths):.0f}, RSS {rss_before:.0f} -> {rss_after:.0f} MB")  # fmt: skip
    assert not other, other[:5]
    assert ok, "nothing was answered"
    assert len(refused) >= BURST / 2 and exhausted >= MAX_QUEUE
    # Refusals do not wait for the model: as the server measures them, most take less than one forward
    # pass of this same run (a refusal that queued would take at least one). Judged against the run's
    # own forward time, not a wall-clock figure, so a slow or busy machine cannot fail it.
    after = scrape(server.metrics_url)

    def grew(name: str, **labels: str) -> float:
        return after.value(name, **labels) - before.value(name, **labels)

    forward_s = grew("cbam_stage_duration_seconds_sum", stage="inference") / grew(
        "cbam_stage_duration_seconds_count", stage="inference"
    )
    quick = min(b for b in LATENCY_BUCKETS if b >= max(0.05, forward_s))
    series = dict(method="Classify", code="RESOURCE_EXHAUSTED")
    fast = grew("cbam_request_duration_seconds_bucket", le=str(quick), **series)
    counted = grew("cbam_request_duration_seconds_count", **series)
    assert counted == exhausted and fast >= 0.75 * counted, (fast, counted, quick, forward_s)
    assert max(depths) <= MAX_QUEUE
    assert rss_after - rss_before < 200
    await _still_fine(server)


@pytest.mark.slow
async def test_a_stream_burst_far_above_capacity_refuses_items_not_the_stream(slow_server):
    """2000 items on one stream against a queue of 4: each item is answered or refused on its own,
    and the stream itself ends OK."""
    requests = [pb.ClassifyRequest(request_id=f"b{i}", encoded=IMAGE) for i in range(2000)]
    async with grpc.aio.insecure_channel(slow_server.address) as channel:
        call = stub_for(channel).ClassifyStream(iter(requests), timeout=240)
        answers = [answer async for answer in call]
        assert await call.code() is grpc.StatusCode.OK
    assert sorted(a.request_id for a in answers) == sorted(r.request_id for r in requests)
    outcomes = collections.Counter(
        "ok" if a.WhichOneof("outcome") == "response" else grpc.StatusCode(
            next(c for c in grpc.StatusCode if c.value[0] == a.error.code)).name
        for a in answers
    )  # fmt: skip
    print(f"stream burst of 2000: {dict(outcomes)}")
    assert set(outcomes) <= {"ok", "RESOURCE_EXHAUSTED"} and outcomes["ok"] > 0
    await _still_fine(slow_server)
