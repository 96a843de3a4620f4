"""The hostile corpus (corpus.py) against a real server, while good requests run at the same time.

Each case gets a correct answer or a clear INVALID_ARGUMENT / RESOURCE_EXHAUSTED; the server stays
SERVING, logs no internal error, and every good request sent meanwhile succeeds.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest

from cbam.v1 import inference_pb2 as pb
from loadtest.faults import served_methods
from server.launcher import metric
from tests.reliability import corpus
from tests.reliability.probes import (
    CHANNEL_OPTIONS,
    check_response,
    health_status,
    model_info,
    probabilities_of,
    stub_for,
)
from tests.support import eventually

pytestmark = pytest.mark.timeout(120)

# Same input, same model, maybe a different batch: only float summation order may differ.
SAME = 1e-3


@pytest.fixture(scope="module")
def log_from(server) -> int:
    """Where this module's part of the shared server's log begins."""
    return len(server.lines)


@pytest.fixture(scope="module")
def info(server) -> pb.ModelInfo:
    return model_info(server.address)


@pytest.fixture(scope="module")
def cases(info) -> list[corpus.Case]:
    return corpus.everything(info)


def test_the_corpus_covers_what_the_issue_lists(cases):
    names = {c.name for c in cases}
    for wanted in ["jpeg-truncated", "png-truncated", "empty", "random-bytes", "png-header-2^31",
                   "png-bomb-30000^2", "1x1-png", "wide-8000x1", "tall-1x8000", "grey-png", "palette-png",
                   "rgba-opaque-png", "cmyk-jpeg", "grey-16bit-png", "exif-rotated-jpeg", "animated-gif",
                   "float32-nan", "float32-inf", "uint8-data-short", "dtype-unknown-7", "attention-kind-99",
                   "top_k-0", "top_k-million", "oversized-message"]:  # fmt: skip
        assert wanted in names


async def _good_traffic(stub, image: bytes, stop: asyncio.Event, results: list) -> None:
    while not stop.is_set():
        try:
            response = await stub.Classify(pb.ClassifyRequest(encoded=image, top_k=2), timeout=30)
            results.append(("OK", len(response.labels)))
        except grpc.aio.AioRpcError as exc:
            results.append((exc.code().name, exc.details()))


async def _send(stub, case: corpus.Case) -> tuple[grpc.StatusCode, pb.ClassifyResponse | str]:
    try:
        return grpc.StatusCode.OK, await stub.Classify(case.request, timeout=60)
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""


async def test_every_hostile_request_gets_a_right_answer_or_a_clear_refusal(server, info, cases):
    good_image = corpus.encode(corpus.picture(28, 28, seed=11))
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        stub = stub_for(channel)
        stop, good = asyncio.Event(), []
        traffic = [asyncio.create_task(_good_traffic(stub, good_image, stop, good)) for _ in range(3)]
        limit = asyncio.Semaphore(8)

        async def send(case):
            async with limit:
                return await _send(stub, case)

        try:
            outcomes = await asyncio.gather(*(send(c) for c in cases))
        finally:
            stop.set()
            await asyncio.gather(*traffic)

    wrong = []
    for case, (code, answer) in zip(cases, outcomes, strict=True):
        if code not in case.expect:
            wrong.append(f"{case.name}: {code.name} {answer if isinstance(answer, str) else ''}"[:300])
        elif code is grpc.StatusCode.OK:
            try:
                check_response(answer, info, case.request.top_k)
            except AssertionError as exc:
                wrong.append(f"{case.name}: bad answer: {exc}"[:300])
        elif not answer.strip() or "Traceback" in answer:
            wrong.append(f"{case.name}: {code.name} with an unhelpful message {answer!r}"[:300])
    assert not wrong, "unexpected outcomes:\n" + "\n".join(wrong)

    assert good and all(code == "OK" for code, _ in good), [g for g in good if g[0] != "OK"][:5]
    assert health_status(server.address) == "SERVING"
    assert health_status(server.address, "cbam.v1.InferenceService") == "SERVING"
    assert not server.events_named("request failed"), server.events_named("request failed")[:3]
    assert not server.events_named("batch failed")


@pytest.mark.parametrize("name", ["exif-rotated-jpeg", "animated-gif", "grey-16bit-png", "rgb-16bit-png",
                                  "cmyk-jpeg", "palette-png", "grey-png", "bilevel-png", "rgba-opaque-png",
                                  "la-opaque-png", "webp", "bmp"])  # fmt: skip
async def test_odd_encodings_classify_like_what_they_show(server, info, cases, name):
    """EXIF orientation honoured, first GIF frame, 16-bit scaled not clipped, CMYK and palettes converted:
    each case's prediction equals that of the plain RGB picture it should decode to (`reference`), and,
    where the wrong decoding would show something else (`decoy`), differs from that one."""
    case = next(c for c in cases if c.name == name)
    classes = len(info.labels)

    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        stub = stub_for(channel)

        async def probabilities(encoded: bytes) -> np.ndarray:
            request = pb.ClassifyRequest(encoded=encoded, top_k=classes)
            return probabilities_of(await stub.Classify(request, timeout=30), classes)

        request = pb.ClassifyRequest()
        request.CopyFrom(case.request)
        request.top_k = classes
        got = probabilities_of(await stub.Classify(request, timeout=30), classes)
        want = await probabilities(case.reference)
        np.testing.assert_allclose(got, want, atol=SAME, err_msg=f"{name}: not classified like its reference")
        if case.decoy is not None:
            decoy = await probabilities(case.decoy)
            assert np.abs(want - decoy).max() > 10 * SAME, f"{name}: this model cannot tell the decoy apart"
            assert np.abs(got - decoy).max() > 10 * SAME, f"{name}: classified like the wrong decoding"


async def test_a_large_exif_rotated_jpeg_is_turned_too(server, info):
    """A JPEG many times the model's input size is decoded at a reduced scale (draft mode), so its
    pixels differ a little from a full decode; the orientation must still be honoured: the answer
    is near the upright picture's and far from the stored one's."""
    classes = len(info.labels)
    jpeg, upright, stored = corpus.exif_rotated_jpeg(480, 320)
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        stub = stub_for(channel)

        async def probabilities(encoded: bytes) -> np.ndarray:
            request = pb.ClassifyRequest(encoded=encoded, top_k=classes)
            return probabilities_of(await stub.Classify(request, timeout=30), classes)

        got, want, decoy = [await probabilities(x) for x in (jpeg, upright, stored)]
    # measured: |got - upright| 0.001, |got - stored| 0.065
    assert np.abs(want - decoy).max() > 0.02, "this model cannot tell the two orientations apart"
    assert np.abs(got - want).max() < np.abs(got - decoy).max() / 3


async def test_the_corpus_through_one_stream_fails_only_its_own_items(server, info, cases):
    """In ClassifyStream a bad item gets its own error and the stream goes on."""
    # Items are told apart by request_id, so the cases about request_id itself are left to the unary test.
    streamable = [c for c in cases if c.name != "oversized-message" and not c.name.startswith("request_id")]
    requests = []
    for i, case in enumerate(streamable):
        request = pb.ClassifyRequest()
        request.CopyFrom(case.request)
        request.request_id = f"{i}"
        requests.append(request)
    answers = {}
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        async for answer in stub_for(channel).ClassifyStream(iter(requests), timeout=60):
            assert answer.request_id not in answers, f"two answers for item {answer.request_id}"
            answers[answer.request_id] = answer
    assert sorted(answers, key=int) == [r.request_id for r in requests]
    wrong = []
    for i, case in enumerate(streamable):
        answer = answers[str(i)]
        if answer.WhichOneof("outcome") == "response":
            code = grpc.StatusCode.OK
            try:
                check_response(answer.response, info, case.request.top_k)
            except AssertionError as exc:
                wrong.append(f"{case.name}: bad answer: {exc}"[:300])
        else:
            code = next(c for c in grpc.StatusCode if c.value[0] == answer.error.code)
            assert answer.error.message
        if code not in case.expect:
            wrong.append(f"{case.name}: {code.name} {answer.error.message}"[:300])
    assert not wrong, "unexpected outcomes:\n" + "\n".join(wrong)


async def test_a_stream_that_sends_nothing_ends_cleanly(server):
    async with grpc.aio.insecure_channel(server.address) as channel:
        call = stub_for(channel).ClassifyStream(iter([]), timeout=10)
        assert [answer async for answer in call] == []
        assert await call.code() is grpc.StatusCode.OK


async def test_a_stream_that_never_half_closes_is_answered_and_ends_at_its_deadline(server):
    """The items sent are answered at once; the call then ends at the client's deadline, and the
    server keeps nothing of it (no request left in flight)."""
    image = corpus.encode(corpus.picture(16, 16))
    never = asyncio.Event()

    async def requests():
        for i in range(3):
            yield pb.ClassifyRequest(request_id=f"r{i}", encoded=image)
        await never.wait()  # no half-close: the stream stays open

    async with grpc.aio.insecure_channel(server.address) as channel:
        # Long enough for three answers: 3 s, or 30 times one call's time now on a machine that slow.
        started = time.monotonic()
        await stub_for(channel).Classify(pb.ClassifyRequest(encoded=image), timeout=120)
        deadline_s = max(3.0, 30 * (time.monotonic() - started))
        call = stub_for(channel).ClassifyStream(requests(), timeout=deadline_s)
        got = []
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for answer in call:
                got.append(answer.request_id)
        assert raised.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert sorted(got) == ["r0", "r1", "r2"]
    await eventually(lambda: metric(server.metrics_url, "cbam_inflight_requests") == 0, what="none in flight")
    assert health_status(server.address) == "SERVING"


async def test_a_stream_left_open_can_be_cancelled_by_its_client(server):
    image = corpus.encode(corpus.picture(16, 16))
    never = asyncio.Event()

    async def requests():
        yield pb.ClassifyRequest(request_id="only", encoded=image)
        await never.wait()

    async with grpc.aio.insecure_channel(server.address) as channel:
        call = stub_for(channel).ClassifyStream(requests())
        first = await call.read()
        assert first.request_id == "only"
        call.cancel()
        assert await call.code() is grpc.StatusCode.CANCELLED
        # the same connection keeps working
        response = await stub_for(channel).Classify(pb.ClassifyRequest(encoded=image), timeout=10)
        assert response.labels


def _peak_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


async def test_a_compressed_message_bomb_is_refused_without_inflating_it(server):
    """64 MiB of zeros gzip to 64 KiB: gRPC must stop decompressing at the message size limit."""
    request = pb.ClassifyRequest(encoded=b"\x89PNG" + bytes(64 * 2**20))
    peak_before = _peak_rss_mb(server.process.pid)
    async with grpc.aio.insecure_channel(server.address, options=CHANNEL_OPTIONS) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await stub_for(channel).Classify(request, compression=grpc.Compression.Gzip, timeout=30)
    del request
    assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _peak_rss_mb(server.process.pid) - peak_before < 48  # the 2 MiB limit, not 64 MiB
    assert health_status(server.address) == "SERVING"


async def test_oversized_metadata_is_refused_and_the_connection_keeps_working(server):
    image = corpus.encode(corpus.picture(16, 16))
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = stub_for(channel)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            junk = [("x-junk", "a" * 100_000)]
            await stub.Classify(pb.ClassifyRequest(encoded=image), metadata=junk, timeout=10)
        assert raised.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert (await stub.Classify(pb.ClassifyRequest(encoded=image), timeout=10)).labels


async def test_many_idle_streams_do_not_starve_other_callers(server):
    """100 streams that each send one item and then sit open, never half-closing: a caller on
    another connection is still answered at once."""
    image = corpus.encode(corpus.picture(16, 16))
    never = asyncio.Event()

    def requests(i):
        async def gen():
            yield pb.ClassifyRequest(request_id=f"idle{i}", encoded=image)
            await never.wait()

        return gen()

    async def one_call() -> float:
        async with grpc.aio.insecure_channel(server.address) as channel:
            started = time.monotonic()
            response = await stub_for(channel).Classify(pb.ClassifyRequest(encoded=image), timeout=120)
            assert response.labels
            return time.monotonic() - started

    alone_s = await one_call()  # the same call on this machine, now, with no idle stream open
    async with grpc.aio.insecure_channel(server.address) as idle_channel:
        calls = [stub_for(idle_channel).ClassifyStream(requests(i), timeout=300) for i in range(100)]
        firsts = await asyncio.gather(*(call.read() for call in calls))
        assert {f.request_id for f in firsts} == {f"idle{i}" for i in range(100)}
        beside_idle_s = await one_call()
        # Answered while every idle stream still holds its slot (not after one went away), and at
        # once: within 2 s, or ten times the call alone on a machine too busy for that.
        assert not any(call.done() for call in calls)
        assert beside_idle_s < max(2.0, 10 * alone_s), (beside_idle_s, alone_s)
        for call in calls:
            call.cancel()
    assert health_status(server.address) == "SERVING"


MALFORMED = [b"\xff\xff\xff", b"\x12\xff\xff\xff\xff\x0f", b"\x0a\x05\xff\xfe\xfd\xfc\xfb", b"\x1a\x02\x08"]


@pytest.mark.parametrize("raw", MALFORMED)
async def test_bytes_that_are_not_a_request_message_are_invalid_argument(server, log_from, raw):
    """Malformed protobuf (bad wire format, a string that is not UTF-8, a truncated sub-message):
    INVALID_ARGUMENT naming the message, not UNKNOWN with a traceback in the server log."""
    async with grpc.aio.insecure_channel(server.address) as channel:
        classify = channel.unary_unary("/cbam.v1.InferenceService/Classify")  # raw bytes in and out
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            await classify(raw, timeout=10)
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
        assert "cbam.v1.ClassifyRequest" in raised.value.details()

        stream = channel.stream_stream("/cbam.v1.InferenceService/ClassifyStream")
        good = pb.ClassifyRequest(request_id="good", encoded=corpus.encode(corpus.picture(8, 8)))
        call = stream(iter([good.SerializeToString(), raw]), timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as raised:
            async for _ in call:
                pass
        assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, raised.value.details()
    errors = [line for line in server.lines[log_from:] if '"level": "ERROR"' in line]
    assert not errors, f"a hostile message logged an error: {errors[:1]}"
    assert health_status(server.address) == "SERVING"


async def test_every_method_of_every_service_refuses_bytes_that_are_not_its_message(server, log_from):
    """Every method the server lists by reflection (health and reflection too, and whatever is added
    later): INVALID_ARGUMENT naming its request message, never gRPC's UNKNOWN with a traceback."""
    methods = await asyncio.to_thread(served_methods, server.address)
    assert {"/grpc.health.v1.Health/Check", "/cbam.v1.InferenceService/Classify"} <= {m.path for m in methods}
    raw = b"\xff\xff\xff"
    async with grpc.aio.insecure_channel(server.address) as channel:
        for method in methods:
            if method.client_streaming:
                make = channel.stream_stream if method.server_streaming else channel.stream_unary
                call = make(method.path)(iter([raw]), timeout=10)
            else:
                make = channel.unary_stream if method.server_streaming else channel.unary_unary
                call = make(method.path)(raw, timeout=10)
            with pytest.raises(grpc.aio.AioRpcError) as raised:
                if method.server_streaming:
                    async for _ in call:
                        pass
                else:
                    await call
            assert raised.value.code() is grpc.StatusCode.INVALID_ARGUMENT, (
                method.path,
                raised.value.details(),
            )
            assert method.request.full_name in raised.value.details()
    errors = [line for line in server.lines[log_from:] if '"level": "ERROR"' in line]
    assert not errors, f"a hostile message logged an error: {errors[:1]}"
