"""The service in process, over a real loopback socket: answers, failures as statuses, deadlines,
cancellation, backpressure, health and draining."""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.runner import ModelRunner
from tests.server.conftest import png, sample
from tests.support import eventually, steady

INVALID, EXHAUSTED = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_classify_one_image(make_server, connect) -> None:
    server = await make_server()
    response = await connect(server).Classify(pb.ClassifyRequest(request_id="one", encoded=png()))
    assert response.request_id == "one"
    assert len(response.labels) == 5  # the default top_k
    probabilities = [label.probability for label in response.labels]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001
    assert response.labels[0].name == server.pipeline.description.labels[response.labels[0].index]
    assert response.model_version == server.pipeline.description.version
    assert response.timings.batch_size == 1 and response.timings.inference_seconds > 0
    assert not response.attention


async def test_request_id_is_made_up_when_empty(make_server, connect) -> None:
    server = await make_server()
    response = await connect(server).Classify(pb.ClassifyRequest(encoded=png()))
    assert len(response.request_id) == 32


async def test_model_info(make_server, connect) -> None:
    server = await make_server("--batching.max_batch_size", "4", "--batching.max_queue", "9")
    info = await connect(server).GetModelInfo(pb.GetModelInfoRequest())
    d = server.pipeline.description
    assert (info.arch, info.version, list(info.labels)) == (d.arch, d.version, list(d.labels))
    assert (info.input_height, info.input_width) == d.input_size
    assert list(info.attention_blocks) == list(d.attention_blocks) and info.attention_blocks
    assert (info.device, info.dtype) == ("cpu", "float32")
    assert (info.batching.max_batch_size, info.batching.max_queue) == (4, 9)
    assert info.num_parameters > 0 and info.max_image_pixels > 0 and info.max_message_bytes > 0


def _tensor(dtype: int, shape: list[int], data: bytes) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(tensor=pb.Tensor(dtype=dtype, shape=shape, data=data))


def _bad_requests() -> list[tuple[str, pb.ClassifyRequest, grpc.StatusCode, str]]:
    nan = np.zeros((3, 8, 8), "<f4")
    nan[0, 0, 0] = np.nan
    blocks = pb.AttentionRequest(kind=pb.ATTENTION_KIND_SPATIAL, blocks=["layer9.9"])
    return [
        ("undecodable bytes", pb.ClassifyRequest(encoded=b"GIF89a not really"), INVALID, "image.encoded"),
        ("empty bytes", pb.ClassifyRequest(encoded=b""), INVALID, "image.encoded is empty"),
        ("empty request", pb.ClassifyRequest(), INVALID, "empty request"),
        ("dtype unset", _tensor(0, [8, 8, 3], bytes(192)), INVALID, "image.tensor.dtype"),
        ("dtype unknown", _tensor(9, [8, 8, 3], bytes(192)), INVALID, "unknown value 9"),
        (
            "shape vs data",
            _tensor(pb.Tensor.DTYPE_UINT8, [8, 8, 3], bytes(100)),
            INVALID,
            "image.tensor.data",
        ),
        ("bad rank", _tensor(pb.Tensor.DTYPE_UINT8, [64, 3], bytes(192)), INVALID, "image.tensor.shape"),
        ("NaN", _tensor(pb.Tensor.DTYPE_FLOAT32, [3, 8, 8], nan.tobytes()), INVALID, "NaN or Inf"),
        (
            "pixel limit",
            pb.ClassifyRequest(encoded=png(size=(300, 200))),
            EXHAUSTED,
            "over the limit of 50000",
        ),
        ("tensor pixel limit", _tensor(1, [1000, 1000, 3], b""), EXHAUSTED, "over the limit"),
        ("top_k too large", pb.ClassifyRequest(encoded=png(), top_k=11), INVALID, "top_k"),
        ("unknown block", pb.ClassifyRequest(encoded=png(), attention=blocks), INVALID, "layer9.9"),
        (
            "unknown kind",
            pb.ClassifyRequest(encoded=png(), attention=pb.AttentionRequest(kind=7)),
            INVALID,
            "attention.kind",
        ),
        (
            "unknown format",
            pb.ClassifyRequest(encoded=png(), attention=pb.AttentionRequest(kind=1, format=5)),
            INVALID,
            "attention.format",
        ),
        ("long request id", pb.ClassifyRequest(request_id="x" * 129, encoded=png()), INVALID, "request_id"),
    ]


async def test_every_bad_input_is_answered_with_its_reason_and_spares_its_batch(
    make_server, connect, gate
) -> None:
    server = await make_server("--limits.max_image_pixels", "50000")
    stub = connect(server)
    cases = _bad_requests()
    # A first call holds the model, so the good calls queue up behind it and share the next batch
    # however fast the machine is; the bad ones are sent among them.
    first = await gate.hold(stub.Classify(pb.ClassifyRequest(encoded=png(9))))
    good = [asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(encoded=png(i)))) for i in range(4)]
    bad = [asyncio.ensure_future(stub.Classify(request)) for _, request, _, _ in cases]
    await eventually(lambda: server.pipeline.batcher.depth >= len(good))
    gate.release()
    await first
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(isinstance(r, pb.ClassifyResponse) for r in results[:4]), results[:4]
    assert min(r.timings.batch_size for r in results[:4]) > 1  # the good ones were batched
    for (name, _, code, message), result in zip(cases, results[4:], strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), name
        assert result.code() == code, (name, result.details())
        assert message in result.details(), (name, result.details())
    assert sample(server, "cbam_requests_total", method="Classify", code="INTERNAL") == 0


async def test_oversized_message_is_resource_exhausted(make_server, connect) -> None:
    server = await make_server("--limits.max_message_bytes", "4096")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await connect(server).Classify(pb.ClassifyRequest(encoded=bytes(10_000)))
    assert info.value.code() == EXHAUSTED


async def test_deadline_that_expires_in_the_queue_is_not_computed(make_server, connect, gate) -> None:
    server = await make_server("--batching.max_batch_size", "1", "--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    first = await gate.hold(stub.Classify(pb.ClassifyRequest(encoded=png())))
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Classify(pb.ClassifyRequest(encoded=png(1)), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.release()
    await first
    await eventually(lambda: sample(server, "cbam_dropped_requests_total", reason="deadline") == 1)
    assert gate.computed == [1]  # the expired request never reached the model
    await eventually(
        lambda: sample(server, "cbam_requests_total", method="Classify", code="DEADLINE_EXCEEDED") == 1
    )


async def test_cancelled_call_is_not_computed(make_server, connect, gate) -> None:
    server = await make_server("--batching.max_batch_size", "1", "--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    first = await gate.hold(stub.Classify(pb.ClassifyRequest(encoded=png())))
    call = stub.Classify(pb.ClassifyRequest(encoded=png(1)))
    await eventually(lambda: server.pipeline.batcher.depth == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await eventually(lambda: sample(server, "cbam_requests_total", method="Classify", code="CANCELLED") == 1)
    gate.release()
    await first
    await eventually(lambda: sample(server, "cbam_dropped_requests_total", reason="cancelled") == 1)
    assert gate.computed == [1]


async def test_full_queue_answers_resource_exhausted_at_once(make_server, connect, gate) -> None:
    server = await make_server(
        "--batching.max_batch_size", "1", "--batching.max_queue", "2", "--batching.max_batch_delay_ms", "0"
    )
    stub = connect(server)
    computing = await gate.hold(stub.Classify(pb.ClassifyRequest(encoded=png())))
    queued = [asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(encoded=png(i)))) for i in (1, 2)]
    await eventually(lambda: server.pipeline.batcher.depth == 2)
    started = time.monotonic()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Classify(pb.ClassifyRequest(encoded=png(3)))
    assert info.value.code() == EXHAUSTED and "queue is full" in info.value.details()
    assert time.monotonic() - started < 1.0
    gate.release()
    assert all(r.labels for r in await asyncio.gather(computing, *queued))
    assert sample(server, "cbam_dropped_requests_total", reason="overloaded") == 1


async def test_stream_answers_each_item_and_a_bad_one_fails_alone(make_server, connect) -> None:
    server = await make_server()
    requests = [pb.ClassifyRequest(request_id=f"item-{i}", encoded=png(i), top_k=2) for i in range(6)]
    requests[3] = pb.ClassifyRequest(request_id="item-3", encoded=b"not an image")
    requests[4] = pb.ClassifyRequest(encoded=png(4), top_k=99)  # no id: one is made up for its error

    async def send():
        for request in requests:
            yield request

    answers = [answer async for answer in connect(server).ClassifyStream(send())]
    assert len(answers) == 6
    by_id = {a.request_id: a for a in answers}
    assert by_id["item-3"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "image.encoded" in by_id["item-3"].error.message
    errors = [a for a in answers if a.WhichOneof("outcome") == "error"]
    assert len(errors) == 2 and any("top_k" in a.error.message and a.request_id for a in errors)
    for i in (0, 1, 2, 5):
        assert len(by_id[f"item-{i}"].response.labels) == 2
    assert sample(server, "cbam_requests_total", method="ClassifyStream", code="OK") == 4
    assert sample(server, "cbam_requests_total", method="ClassifyStream", code="INVALID_ARGUMENT") == 2


async def test_health_is_serving_only_once_warm_and_not_serving_while_draining(
    make_server, monkeypatch: pytest.MonkeyPatch
) -> None:
    warm = asyncio.Event()
    original = ModelRunner.warm_up

    def slow_warm_up(runner, sizes):
        asyncio.run_coroutine_threadsafe(warm.wait(), loop).result(10)
        original(runner, sizes)

    loop = asyncio.get_running_loop()
    monkeypatch.setattr(ModelRunner, "warm_up", slow_warm_up)
    server = await make_server(start=False)
    starting = asyncio.ensure_future(server.start())
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        check = health_pb2.HealthCheckRequest
        for service in ("", "cbam.v1.InferenceService"):
            response = await health.Check(check(service=service), wait_for_ready=True)
            assert response.status == health_pb2.HealthCheckResponse.NOT_SERVING
        warm.set()
        await starting
        response = await health.Check(check(service="cbam.v1.InferenceService"))
        assert response.status == health_pb2.HealthCheckResponse.SERVING

        watch = health.Watch(check(service=""))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(server.stop(5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
        await stopping


async def test_stop_finishes_calls_in_flight_and_queued(make_server, connect, gate) -> None:
    server = await make_server("--batching.max_batch_size", "2", "--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    gate.close()
    calls = [asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(encoded=png(i)))) for i in range(5)]
    await gate.wait_entered()
    await eventually(lambda: sample(server, "cbam_inflight_requests") == 5)
    stopping = asyncio.ensure_future(server.stop(10))
    await eventually(lambda: server.calls.draining)  # the stop has begun while all five wait
    gate.release()
    assert all(r.labels for r in await asyncio.gather(*calls))
    await stopping
    assert sum(gate.computed) == 5


async def test_tokens_guard_the_inference_service_but_not_health(make_server) -> None:
    server = await make_server("--auth.tokens", '["s3cret"]')
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.GetModelInfo(pb.GetModelInfoRequest())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.Classify(
                pb.ClassifyRequest(encoded=png()), metadata=[("authorization", "Bearer nope")]
            )
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        ok = await stub.Classify(
            pb.ClassifyRequest(encoded=png()), metadata=[("authorization", "Bearer s3cret")]
        )
        assert ok.labels
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert health.status == health_pb2.HealthCheckResponse.SERVING


async def test_tls_with_client_certificates(make_server, tmp_path) -> None:
    from tests.security.certs import make_pki

    pki = make_pki(tmp_path)
    server = await make_server(
        "--tls.cert_file", str(pki.server_cert), "--tls.key_file", str(pki.server_key),
        "--tls.client_ca_file", str(pki.ca_cert),
    )  # fmt: skip
    target = f"127.0.0.1:{server.port}"
    trusted = grpc.ssl_channel_credentials(
        root_certificates=pki.ca_cert.read_bytes(),
        private_key=pki.client_key.read_bytes(),
        certificate_chain=pki.client_cert.read_bytes(),
    )
    async with grpc.aio.secure_channel(target, trusted) as channel:
        info = await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(pb.GetModelInfoRequest())
        assert info.arch
    anonymous = grpc.ssl_channel_credentials(root_certificates=pki.ca_cert.read_bytes())
    async with grpc.aio.secure_channel(target, anonymous) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
                pb.GetModelInfoRequest(), timeout=5
            )
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE


async def test_calls_arriving_while_draining_are_refused_unavailable(make_server, connect, gate) -> None:
    server = await make_server("--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    taken = await gate.hold(stub.Classify(pb.ClassifyRequest(encoded=png())))
    stopping = asyncio.ensure_future(server.stop(10))
    await eventually(lambda: server.calls.draining)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.Classify(pb.ClassifyRequest(encoded=png(1)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "shutting down" in info.value.details()
    gate.release()
    assert (await taken).labels  # what was taken before the drain is answered
    await stopping
    assert gate.computed == [1]


async def test_a_stream_ends_unavailable_once_its_items_are_answered(make_server, connect, gate) -> None:
    server = await make_server("--batching.max_batch_delay_ms", "0")
    gate.close()
    hold = asyncio.Event()

    async def send():
        yield pb.ClassifyRequest(request_id="taken", encoded=png())
        await hold.wait()  # the client keeps the stream open
        yield pb.ClassifyRequest(request_id="late", encoded=png(1))

    call = connect(server).ClassifyStream(send())
    reading = asyncio.ensure_future(call.read())
    await gate.wait_entered()
    stopping = asyncio.ensure_future(server.stop(10))
    await eventually(lambda: server.calls.draining)
    gate.release()
    first = await reading
    assert first.request_id == "taken" and first.response.labels
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call.read()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    hold.set()
    await stopping


async def test_a_stream_nobody_reads_stops_being_read(make_server) -> None:
    server = await make_server("--limits.max_stream_inflight", "8")
    attention = pb.AttentionRequest(kind=pb.ATTENTION_KIND_BOTH)  # ~3 kB answers
    image = png()

    async def send():
        for i in range(2000):
            yield pb.ClassifyRequest(request_id=str(i), encoded=image, attention=attention)

    # Without BDP probing the client's receive window stays at 64 kB, so what the server may have
    # written is that window's worth of answers plus the items it holds (max_stream_inflight).
    options = [("grpc.http2.bdp_probe", 0)]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}", options=options) as channel:
        call = inference_pb2_grpc.InferenceServiceStub(channel).ClassifyStream(send())
        # Nothing is read: the count of answers must stop growing (at a bound, checked below).
        answered = await steady(
            lambda: sample(server, "cbam_requests_total", method="ClassifyStream", code="OK"),
            what="the answers to a stream nobody reads",
        )
        call.cancel()
    assert 8 <= answered < 100, answered
    await eventually(lambda: sample(server, "cbam_inflight_requests") == 0)


async def test_attention_on_and_off_share_one_batch_and_get_what_they_asked(
    make_server, connect, gate
) -> None:
    server = await make_server("--batching.max_batch_size", "8", "--batching.max_batch_delay_ms", "0")
    stub = connect(server)
    blocks = list(server.pipeline.description.attention_blocks)
    blocker = await gate.hold(stub.Classify(pb.ClassifyRequest(encoded=png())))
    asks = [
        pb.AttentionRequest(),
        pb.AttentionRequest(kind=pb.ATTENTION_KIND_CHANNEL, blocks=[blocks[0]]),
        pb.AttentionRequest(
            kind=pb.ATTENTION_KIND_SPATIAL, blocks=[blocks[-1]], format=pb.ATTENTION_FORMAT_PNG
        ),
        pb.AttentionRequest(),
    ]
    calls = [
        asyncio.ensure_future(stub.Classify(pb.ClassifyRequest(encoded=png(i), attention=a)))
        for i, a in enumerate(asks)
    ]
    await eventually(lambda: server.pipeline.batcher.depth == len(asks))  # all queued behind the blocker
    gate.release()
    await blocker
    responses = await asyncio.gather(*calls)
    assert gate.computed == [1, len(asks)]  # the four shared one forward pass
    assert all(r.timings.batch_size == len(asks) for r in responses)
    got = [[(m.block, m.kind, m.format) for m in r.attention] for r in responses]
    assert got == [
        [],
        [(blocks[0], pb.ATTENTION_KIND_CHANNEL, pb.ATTENTION_FORMAT_FLOAT16)],
        [(blocks[-1], pb.ATTENTION_KIND_SPATIAL, pb.ATTENTION_FORMAT_PNG)],
        [],
    ]


@pytest.mark.parametrize(
    ("cert", "key", "ca", "field"),
    [
        ("server_cert", "client_key", None, "tls.key_file"),
        ("garbage", "server_key", None, "tls.cert_file"),
        ("server_cert", "server_key", "garbage", "tls.client_ca_file"),
    ],
)
async def test_unusable_certificate_files_stop_the_start_naming_the_file(
    tmp_path, cert, key, ca, field
) -> None:
    from server.app import build_server
    from server.config import load_settings
    from server.errors import StartupError
    from tests.security.certs import make_pki

    pki = make_pki(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")

    def path(name: str) -> str:
        return str(garbage) if name == "garbage" else str(getattr(pki, name))

    argv = ["--host", "127.0.0.1", "--port", "0", "--tls.cert_file", path(cert), "--tls.key_file", path(key)]
    if ca:
        argv += ["--tls.client_ca_file", path(ca)]
    with pytest.raises(StartupError) as info:
        build_server(load_settings(argv))
    assert info.value.field == field


@pytest.mark.parametrize(
    ("host", "warned"),
    [("[::]", True), ("0.0.0.0", True), ("10.1.2.3", True), ("127.0.0.1", False), ("[::1]", False)],
)
def test_plaintext_beyond_loopback_is_warned_about(host: str, warned: bool) -> None:
    from server.app import plaintext_warning
    from server.config import load_settings

    assert (plaintext_warning(load_settings(["--host", host])) is not None) is warned
