"""The Open Inference Protocol in process, over a real loopback socket, with our own stubs: tensors in
and out, every bad input as a status, batching shared with cbam.v1, deadlines, cancellation, queue
bound, readiness during warm-up and drain, auth, metrics. (tritonclient itself: tests/e2e.)"""

from __future__ import annotations

import asyncio
import io
import struct
import time
from collections.abc import AsyncIterator, Callable

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from cbam.oip import grpc_service_pb2 as pb
from cbam.oip import grpc_service_pb2_grpc
from cbam.v1 import inference_pb2 as v1
from cbam.v1 import inference_pb2_grpc
from server.app import InferenceServer
from server.runner import ModelRunner
from tests.server.conftest import sample
from tests.support import eventually

MODEL = "cbam_resnet8_cifar"
INVALID = grpc.StatusCode.INVALID_ARGUMENT
Stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub


@pytest.fixture
async def oip() -> AsyncIterator[Callable[[InferenceServer], Stub]]:
    channels: list[grpc.aio.Channel] = []

    def stub(server: InferenceServer) -> Stub:
        channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
        channels.append(channel)
        return Stub(channel)

    yield stub
    for channel in channels:
        await channel.close()


def pixels(count: int, seed: int = 0) -> np.ndarray:
    """``count`` random 32 x 32 RGB images, uint8 N x H x W x 3."""
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def encode(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def infer_request(
    array: np.ndarray | None = None,
    *,
    name: str = "images",
    datatype: str = "UINT8",
    shape: list[int] | None = None,
    raw: bytes | None = None,
    outputs: tuple[str, ...] = (),
    model: str = MODEL,
    request_id: str = "",
) -> pb.ModelInferRequest:
    """A ModelInfer request with one input, in raw_input_contents."""
    request = pb.ModelInferRequest(model_name=model, id=request_id)
    request.inputs.add(name=name, datatype=datatype, shape=shape if shape is not None else list(array.shape))
    request.raw_input_contents.append(raw if raw is not None else array.tobytes())
    for output in outputs:
        request.outputs.add(name=output)
    return request


def frame(elements: list[bytes]) -> bytes:
    """A BYTES tensor's raw contents: each element length-prefixed."""
    return b"".join(struct.pack("<I", len(e)) + e for e in elements)


def unframe(raw: bytes) -> list[str]:
    elements, offset = [], 0
    while offset < len(raw):
        (length,) = struct.unpack_from("<I", raw, offset)
        elements.append(raw[offset + 4 : offset + 4 + length].decode())
        offset += 4 + length
    return elements


def output(response: pb.ModelInferResponse, name: str, dtype: str = "<f4") -> np.ndarray:
    for i, tensor in enumerate(response.outputs):
        if tensor.name == name:
            return np.frombuffer(response.raw_output_contents[i], dtype=dtype).reshape(tuple(tensor.shape))
    raise KeyError(name)


async def hold_the_model(stub: Stub, gate) -> asyncio.Future:
    """One ModelInfer computing behind the closed gate, so that what comes next queues."""
    gate.close()
    first = asyncio.ensure_future(stub.ModelInfer(infer_request(pixels(1))))
    await gate.wait_entered()
    return first


async def classify_probabilities(server: InferenceServer, images: np.ndarray) -> np.ndarray:
    """cbam.v1 Classify of each image (uint8 tensor), every class's probability: N x 10."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        tensors = [
            v1.Tensor(dtype=v1.Tensor.DTYPE_UINT8, shape=[32, 32, 3], data=i.tobytes()) for i in images
        ]
        answers = await asyncio.gather(
            *(stub.Classify(v1.ClassifyRequest(tensor=t, top_k=10)) for t in tensors)
        )
    out = np.zeros((len(images), 10))
    for row, answer in enumerate(answers):
        for label in answer.labels:
            out[row, label.index] = label.probability
    return out


async def test_metadata_config_index_and_readiness(make_server, oip) -> None:
    server = await make_server("--batching.max_batch_size", "8", "--limits.max_batch_items", "64")
    stub = oip(server)
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL, version="digits-1"))).ready
    server_info = await stub.ServerMetadata(pb.ServerMetadataRequest())
    assert server_info.name == "cbam-serve" and "classification" in server_info.extensions

    meta = await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert (meta.name, list(meta.versions), meta.platform) == (MODEL, ["digits-1"], "pytorch")
    inputs = {t.name: (t.datatype, list(t.shape)) for t in meta.inputs}
    assert inputs == {
        "images": ("UINT8", [-1, 32, 32, 3]),
        "encoded_images": ("BYTES", [-1, 1]),
        "normalized_images": ("FP32", [-1, 3, 32, 32]),
    }
    outputs = {t.name: (t.datatype, list(t.shape)) for t in meta.outputs}
    assert outputs["probabilities"] == ("FP32", [-1, 10])
    # Every block's two maps, each with the shape the model computes.
    assert outputs["attention/layer1.0/channel"] == ("FP32", [-1, 16])
    assert outputs["attention/layer1.0/spatial"] == ("FP32", [-1, 32, 32])
    assert outputs["attention/layer3.0/spatial"] == ("FP32", [-1, 8, 8])
    assert len(outputs) == 1 + 2 * len(server.pipeline.description.attention_blocks)
    assert meta.properties["labels"] == ",".join(server.pipeline.description.labels)

    config = (await stub.ModelConfig(pb.ModelConfigRequest(name=MODEL))).config
    assert (config.name, config.max_batch_size) == (MODEL, 64)
    assert list(config.dynamic_batching.preferred_batch_size) == [8]
    assert config.dynamic_batching.default_queue_policy.max_queue_size == 1024
    assert [i.name for i in config.input] == ["images", "encoded_images", "normalized_images"]
    assert all(i.optional for i in config.input) and list(config.input[0].dims) == [32, 32, 3]
    assert [o.name for o in config.output] == [t.name for t in meta.outputs]

    index = await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
    assert [(m.name, m.version, m.state) for m in index.models] == [(MODEL, "digits-1", "READY")]


async def test_unknown_model_or_version_is_not_found(make_server, oip) -> None:
    server = await make_server()
    stub = oip(server)
    calls = [
        stub.ModelReady(pb.ModelReadyRequest(name="resnet50")),
        stub.ModelMetadata(pb.ModelMetadataRequest(name="")),
        stub.ModelConfig(pb.ModelConfigRequest(name=MODEL, version="7")),
        stub.ModelStatistics(pb.ModelStatisticsRequest(name="resnet50")),
        stub.ModelInfer(infer_request(pixels(1), model="resnet50")),
        stub.ModelInfer(pb.ModelInferRequest(model_name=MODEL, model_version="7")),
    ]
    for outcome in await asyncio.gather(*calls, return_exceptions=True):
        assert isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() == grpc.StatusCode.NOT_FOUND
        assert MODEL in outcome.details() or "digits-1" in outcome.details(), outcome.details()


async def test_a_model_name_of_ones_own(make_server, oip) -> None:
    server = await make_server("--oip.model_name", "digits")
    stub = oip(server)
    assert (await stub.ModelReady(pb.ModelReadyRequest(name="digits"))).ready
    response = await stub.ModelInfer(infer_request(pixels(1), model="digits"))
    assert response.model_name == "digits" and response.model_version == "digits-1"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_every_input_form_gives_cbam_v1s_probabilities(make_server, oip) -> None:
    server = await make_server()
    stub = oip(server)
    images = pixels(5)
    want = await classify_probabilities(server, images)

    raw = await stub.ModelInfer(infer_request(images, request_id="r1"))
    assert raw.id == "r1" and (raw.model_name, raw.model_version) == (MODEL, "digits-1")
    assert [(t.name, t.datatype, list(t.shape)) for t in raw.outputs] == [("probabilities", "FP32", [5, 10])]
    np.testing.assert_allclose(output(raw, "probabilities"), want, atol=1e-5)

    typed = infer_request(images)
    del typed.raw_input_contents[:]
    typed.inputs[0].contents.uint_contents.extend(images.reshape(-1).tolist())
    np.testing.assert_allclose(output(await stub.ModelInfer(typed), "probabilities"), want, atol=1e-5)

    d = server.pipeline.description
    normalized = ((images / 255.0 - np.array(d.mean)) / np.array(d.std)).transpose(0, 3, 1, 2).astype("<f4")
    fp32 = await stub.ModelInfer(infer_request(normalized, name="normalized_images", datatype="FP32"))
    np.testing.assert_allclose(output(fp32, "probabilities"), want, atol=1e-4)

    # Encoded files are decoded as cbam.v1 decodes them (lossless PNG: the same pixels).
    files = [encode(image) for image in images]
    encoded = await stub.ModelInfer(
        infer_request(name="encoded_images", datatype="BYTES", shape=[5, 1], raw=frame(files))
    )
    np.testing.assert_allclose(output(encoded, "probabilities"), want, atol=1e-5)
    typed_files = pb.ModelInferRequest(model_name=MODEL)
    typed_files.inputs.add(
        name="encoded_images", datatype="BYTES", shape=[5, 1]
    ).contents.bytes_contents.extend(files)
    np.testing.assert_allclose(output(await stub.ModelInfer(typed_files), "probabilities"), want, atol=1e-5)


async def test_classification_is_tritons_score_index_label(make_server, oip) -> None:
    server = await make_server()
    stub = oip(server)
    images = pixels(3, seed=4)
    want = await classify_probabilities(server, images)
    request = infer_request(images)
    request.outputs.add(name="probabilities").parameters["classification"].int64_param = 4
    response = await stub.ModelInfer(request)
    (tensor,) = response.outputs
    assert (tensor.datatype, list(tensor.shape)) == ("BYTES", [3, 4])
    strings = unframe(response.raw_output_contents[0])
    labels = server.pipeline.description.labels
    for row in range(3):
        best = np.argsort(-want[row])[:4]
        got = [s.split(":") for s in strings[row * 4 : row * 4 + 4]]
        assert [int(index) for _, index, _ in got] == list(best)
        assert [label for _, _, label in got] == [labels[i] for i in best]
        for (score, index, _), _ in zip(got, best, strict=True):
            assert score == f"{float(score):f}" and abs(float(score) - want[row, int(index)]) < 1e-5
    # More classes than the model has: all of them, as Triton answers.
    request.outputs[0].parameters["classification"].int64_param = 50
    response = await stub.ModelInfer(request)
    assert list(response.outputs[0].shape) == [3, 10]


async def test_attention_outputs_are_cbam_v1s_maps(make_server, oip) -> None:
    server = await make_server()
    stub = oip(server)
    images = pixels(2, seed=7)
    names = ("attention/layer1.0/spatial", "attention/layer3.0/channel", "probabilities")
    response = await stub.ModelInfer(infer_request(images, outputs=names))
    assert [t.name for t in response.outputs] == list(names)
    spatial = output(response, "attention/layer1.0/spatial")
    channel = output(response, "attention/layer3.0/channel")
    assert spatial.shape == (2, 32, 32) and channel.shape == (2, 64)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel_v1:
        v1_stub = inference_pb2_grpc.InferenceServiceStub(channel_v1)
        tensor = v1.Tensor(dtype=v1.Tensor.DTYPE_UINT8, shape=[32, 32, 3], data=images[1].tobytes())
        attention = v1.AttentionRequest(kind=v1.ATTENTION_KIND_BOTH, blocks=["layer1.0", "layer3.0"])
        answer = await v1_stub.Classify(v1.ClassifyRequest(tensor=tensor, attention=attention))
    maps = {(m.block, m.kind): np.frombuffer(m.data, "<f2").reshape(tuple(m.shape)) for m in answer.attention}
    np.testing.assert_allclose(spatial[1], maps[("layer1.0", v1.ATTENTION_KIND_SPATIAL)], atol=1e-3)
    np.testing.assert_allclose(channel[1], maps[("layer3.0", v1.ATTENTION_KIND_CHANNEL)], atol=1e-3)

    half = infer_request(images, outputs=names[:1])
    half.parameters["attention_datatype"].string_param = "FP16"
    response = await stub.ModelInfer(half)
    assert response.outputs[0].datatype == "FP16"
    np.testing.assert_allclose(output(response, names[0], "<f2"), spatial, atol=1e-3)


def _bad_requests() -> list[tuple[str, pb.ModelInferRequest, grpc.StatusCode, str]]:
    one = pixels(1)
    unimplemented = grpc.StatusCode.UNIMPLEMENTED

    def changed(change: Callable[[pb.ModelInferRequest], object]) -> pb.ModelInferRequest:
        request = infer_request(one)
        change(request)
        return request

    def param(key: str, **value) -> pb.ModelInferRequest:
        return changed(lambda r: r.parameters[key].MergeFrom(pb.InferParameter(**value)))

    def files(shape: list[int], raw: bytes) -> pb.ModelInferRequest:
        return infer_request(name="encoded_images", datatype="BYTES", shape=shape, raw=raw)

    typed = changed(lambda r: r.ClearField("raw_input_contents"))
    typed.inputs[0].contents.uint_contents.extend([300] * one.size)
    map_top_k = changed(lambda r: r.outputs.add(name="attention/layer1.0/channel"))
    map_top_k.outputs[0].parameters["classification"].int64_param = 2
    nan = np.full((1, 3, 32, 32), np.nan, "<f4")
    return [
        ("datatype", infer_request(one, datatype="FP32"), INVALID, "input 'images': datatype 'FP32'"),
        (
            "shape",
            infer_request(one[:, :16], shape=[1, 16, 32, 3]),
            INVALID,
            "'images': shape [1, 16, 32, 3]",
        ),
        ("rank", infer_request(one, shape=[32, 32, 3]), INVALID, "input 'images': shape [32, 32, 3]"),
        ("no images", infer_request(one, shape=[0, 32, 32, 3], raw=b""), INVALID, "input 'images': shape [0"),
        ("byte count", infer_request(one, raw=one.tobytes()[:-1]), INVALID, "input 'images': 3071 bytes"),
        ("over the limit", infer_request(pixels(9)), INVALID, "input 'images': 9 images, at most 8"),
        (
            "undecodable",
            files([2, 1], frame([encode(one[0]), b"GIF89a no"])),
            INVALID,
            "input 'encoded_images' element 1",
        ),  # fmt: skip
        ("empty file", files([1, 1], frame([b""])), INVALID, "input 'encoded_images': element 0 is empty"),
        ("framing", files([1, 1], b"\xff\x00\x00\x00ab"), INVALID, "'encoded_images': element 0 claims 255"),
        (
            "NaN",
            infer_request(nan, name="normalized_images", datatype="FP32"),
            INVALID,
            "input 'normalized_images': holds NaN",
        ),  # fmt: skip
        ("uint8 range", typed, INVALID, "input 'images': contents.uint_contents holds 300"),
        ("unknown input", infer_request(one, name="pixels"), INVALID, "input 'pixels': this model has no"),
        (
            "two inputs",
            changed(lambda r: r.inputs.add(name="encoded_images")),
            INVALID,
            "inputs: ['images', 'encoded_images']",
        ),  # fmt: skip
        ("no input", pb.ModelInferRequest(model_name=MODEL), INVALID, "inputs: none"),
        (
            "unknown output",
            infer_request(one, outputs=("logits",)),
            INVALID,
            "output 'logits': this model has no",
        ),
        (
            "twice",
            infer_request(one, outputs=("probabilities",) * 2),
            INVALID,
            "'probabilities': asked for twice",
        ),
        ("top-k of a map", map_top_k, INVALID, "classification applies to 'probabilities' only"),
        ("unknown parameter", param("temperature", double_param=0.5), INVALID, "parameter 'temperature'"),
        (
            "map datatype",
            param("attention_datatype", string_param="INT8"),
            INVALID,
            "parameter 'attention_datatype': string 'INT8'",
        ),  # fmt: skip
        (
            "sequence",
            param("sequence_id", int64_param=3),
            unimplemented,
            "sequence batching is not implemented",
        ),
        ("priority", param("priority", uint64_param=1), unimplemented, "priority levels are not implemented"),
        ("long id", infer_request(one, request_id="x" * 200), INVALID, "id: 200 characters"),
    ]


async def test_every_bad_input_is_answered_naming_the_tensor_and_spares_its_batch(make_server, oip) -> None:
    server = await make_server("--limits.max_batch_items", "8", "--batching.max_batch_delay_ms", "20")
    stub = oip(server)
    cases = _bad_requests()
    good = [stub.ModelInfer(infer_request(pixels(2, seed=i))) for i in range(4)]
    bad = [stub.ModelInfer(request) for _, request, _, _ in cases]
    results = await asyncio.gather(*good, *bad, return_exceptions=True)
    assert all(isinstance(r, pb.ModelInferResponse) for r in results[:4]), results[:4]
    for (name, _, code, message), result in zip(cases, results[4:], strict=True):
        assert isinstance(result, grpc.aio.AioRpcError), name
        assert result.code() == code, (name, result.details())
        assert message in result.details(), (name, result.details())
    assert sample(server, "cbam_requests_total", method="ModelInfer", code="INTERNAL") == 0
    assert sample(server, "cbam_requests_total", method="ModelInfer", code="OK") == 4
    assert sample(server, "cbam_images_total", method="ModelInfer", code="OK") == 8


async def test_undecodable_request_bytes_are_invalid_argument(make_server) -> None:
    server = await make_server()
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")  # bytes as they are
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call(b"\x0a\xff\xff\xff")
    assert info.value.code() == INVALID and "not a valid inference.ModelInferRequest" in info.value.details()


async def test_a_request_joins_cbam_v1_traffic_in_one_batch(make_server, oip, connect, gate) -> None:
    server = await make_server("--batching.max_batch_size", "8", "--batching.max_batch_delay_ms", "0")
    stub, v1_stub = oip(server), connect(server)
    blocker = await hold_the_model(stub, gate)
    tensor = v1.Tensor(dtype=v1.Tensor.DTYPE_UINT8, shape=[32, 32, 3], data=pixels(1, 9).tobytes())
    classify = asyncio.ensure_future(v1_stub.Classify(v1.ClassifyRequest(tensor=tensor)))
    batched = asyncio.ensure_future(stub.ModelInfer(infer_request(pixels(3, 1))))
    await eventually(lambda: server.pipeline.batcher.depth == 4)
    gate.release()
    answer, response, _ = await asyncio.gather(classify, batched, blocker)
    assert gate.computed == [1, 4]  # the blocker, then the ModelInfer's three and the Classify together
    assert answer.timings.batch_size == 4 and list(response.outputs[0].shape) == [3, 10]


async def test_a_large_request_is_split_at_max_batch_size_and_answered_in_order(
    make_server, oip, gate
) -> None:
    server = await make_server("--batching.max_batch_size", "4", "--batching.max_batch_delay_ms", "0")
    images = pixels(10, seed=3)
    want = await classify_probabilities(server, images)
    gate.close()
    gate.release()  # count the batches from here on, without holding them
    response = await oip(server).ModelInfer(infer_request(images))
    assert gate.computed == [4, 4, 2]
    np.testing.assert_allclose(output(response, "probabilities"), want, atol=1e-5)


async def test_deadline_and_timeout_parameter_expire_in_the_queue(make_server, oip, gate) -> None:
    server = await make_server("--batching.max_batch_size", "1", "--batching.max_batch_delay_ms", "0")
    stub = oip(server)
    first = await hold_the_model(stub, gate)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(infer_request(pixels(2)), timeout=0.3)
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    request = infer_request(pixels(1))
    request.parameters["timeout"].int64_param = 200_000  # microseconds, Triton's unit
    await eventually(
        lambda: sample(server, "cbam_requests_total", method="ModelInfer", code="DEADLINE_EXCEEDED") == 1
    )
    timing_out = asyncio.ensure_future(stub.ModelInfer(request, timeout=30))
    await eventually(lambda: server.pipeline.batcher.depth == 3)  # the expired request's two, and this one
    # The server set its deadline (same clock) before it was queued: it has passed by then.
    passed = time.monotonic() + 0.2
    await eventually(lambda: time.monotonic() > passed, what="the request's own timeout to pass")
    gate.release()
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await timing_out
    assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await first
    assert gate.computed == [1]  # neither expired request reached the model


async def test_cancelled_request_is_not_computed(make_server, oip, gate) -> None:
    server = await make_server("--batching.max_batch_size", "1", "--batching.max_batch_delay_ms", "0")
    stub = oip(server)
    first = await hold_the_model(stub, gate)
    call = stub.ModelInfer(infer_request(pixels(3)))
    await eventually(lambda: server.pipeline.batcher.depth == 3)
    call.cancel()
    await eventually(
        lambda: sample(server, "cbam_requests_total", method="ModelInfer", code="CANCELLED") == 1
    )
    gate.release()
    await first
    await eventually(lambda: sample(server, "cbam_dropped_requests_total", reason="cancelled") == 3)
    assert gate.computed == [1]


async def test_a_batch_the_queue_cannot_hold_is_refused_whole(make_server, oip, gate) -> None:
    server = await make_server("--batching.max_batch_size", "1", "--batching.max_queue", "4")
    stub = oip(server)
    first = await hold_the_model(stub, gate)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(infer_request(pixels(5)))
    assert (
        info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "none was queued" in info.value.details()
    )
    gate.release()
    await first
    assert server.pipeline.batcher.depth == 0


async def test_stream_answers_each_request_and_a_bad_one_fails_alone(make_server, oip) -> None:
    server = await make_server()
    requests = [infer_request(pixels(2, seed=i), request_id=f"r{i}") for i in range(3)]
    requests[1] = infer_request(pixels(1), request_id="r1", outputs=("logits",))

    async def send():
        for request in requests:
            yield request

    answers = {a.infer_response.id: a async for a in oip(server).ModelStreamInfer(send())}
    assert set(answers) == {"r0", "r1", "r2"}
    assert answers["r1"].error_message.startswith("INVALID_ARGUMENT: output 'logits'")
    for ok in ("r0", "r2"):
        assert not answers[ok].error_message
        assert list(answers[ok].infer_response.outputs[0].shape) == [2, 10]
    assert sample(server, "cbam_requests_total", method="ModelStreamInfer", code="OK") == 2


async def test_statistics_grow_with_every_inference(make_server, oip) -> None:
    server = await make_server()
    stub = oip(server)
    before = (await stub.ModelStatistics(pb.ModelStatisticsRequest())).model_stats[0]
    await stub.ModelInfer(infer_request(pixels(3)))
    with pytest.raises(grpc.aio.AioRpcError):
        await stub.ModelInfer(infer_request(pixels(1), outputs=("logits",)))
    after = (await stub.ModelStatistics(pb.ModelStatisticsRequest(name=MODEL))).model_stats[0]
    s0, s1 = before.inference_stats, after.inference_stats
    assert (after.name, after.version) == (MODEL, "digits-1")
    assert after.inference_count == before.inference_count + 3
    assert after.execution_count > before.execution_count
    assert (s1.success.count, s1.fail.count) == (s0.success.count + 1, s0.fail.count + 1)
    for field in ("success", "queue", "compute_input", "compute_infer", "compute_output"):
        assert getattr(s1, field).ns > getattr(s0, field).ns, field


async def test_other_extensions_are_unimplemented_saying_why(make_server, oip) -> None:
    stub = oip(await make_server())
    calls = {
        "RepositoryModelLoad": stub.RepositoryModelLoad(pb.RepositoryModelLoadRequest()),
        "SystemSharedMemoryRegister": stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest()),
        "CudaSharedMemoryStatus": stub.CudaSharedMemoryStatus(pb.CudaSharedMemoryStatusRequest()),
        "TraceSetting": stub.TraceSetting(pb.TraceSettingRequest()),
        "LogSettings": stub.LogSettings(pb.LogSettingsRequest()),
    }
    for method, outcome in zip(
        calls, await asyncio.gather(*calls.values(), return_exceptions=True), strict=True
    ):
        assert isinstance(outcome, grpc.aio.AioRpcError) and outcome.code() == grpc.StatusCode.UNIMPLEMENTED
        assert outcome.details().startswith(f"{method} is not implemented: "), outcome.details()


async def test_not_ready_while_warming_up_and_while_draining(make_server, oip, monkeypatch) -> None:
    warm = asyncio.Event()
    original = ModelRunner.warm_up
    loop = asyncio.get_running_loop()

    def slow_warm_up(runner, sizes):
        asyncio.run_coroutine_threadsafe(warm.wait(), loop).result(10)
        original(runner, sizes)

    monkeypatch.setattr(ModelRunner, "warm_up", slow_warm_up)
    server = await make_server("--drain_delay_seconds", "30", start=False)
    starting = asyncio.ensure_future(server.start())
    stub = oip(server)
    assert not (await stub.ServerReady(pb.ServerReadyRequest(), wait_for_ready=True)).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert not (await stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))).models
    (entry,) = (await stub.RepositoryIndex(pb.RepositoryIndexRequest())).models
    assert entry.state == "UNAVAILABLE"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE and "warming up" in info.value.details()
    assert (await stub.ServerLive(pb.ServerLiveRequest())).live
    warm.set()
    await starting
    assert (await stub.ServerReady(pb.ServerReadyRequest())).ready

    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        watch = health_pb2_grpc.HealthStub(channel).Watch(check)
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.SERVING
        stopping = asyncio.ensure_future(server.stop(5))
        assert (await watch.read()).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()
    # The drain delay: health says NOT_SERVING and so does ServerReady, while calls are still taken.
    assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready
    assert not (await stub.ModelReady(pb.ModelReadyRequest(name=MODEL))).ready
    assert list((await stub.ModelInfer(infer_request(pixels(1)))).outputs[0].shape) == [1, 10]
    stopping.cancel()
    server.calls.refuse_new_work()  # the drain proper, without waiting out the delay
    assert not (await stub.ServerReady(pb.ServerReadyRequest())).ready  # a probe is still answered
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await stub.ModelInfer(infer_request(pixels(1)))
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # The fixture's stop at teardown need not wait the 30 s delay out again. Set directly, not with
    # monkeypatch, which is undone before make_server's teardown runs.
    server.settings.drain_delay_seconds = 0


async def test_tokens_guard_the_oip_service_too(make_server) -> None:
    server = await make_server("--auth.tokens", '["s3cret"]')
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = Stub(channel)
        for call in (stub.ServerLive(pb.ServerLiveRequest()), stub.ModelInfer(infer_request(pixels(1)))):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await call
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        token = [("authorization", "Bearer s3cret")]
        response = await stub.ModelInfer(infer_request(pixels(1)), metadata=token)
        assert list(response.outputs[0].shape) == [1, 10]
        check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
        health = await health_pb2_grpc.HealthStub(channel).Check(check)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert sample(server, "cbam_requests_total", method="ModelInfer", code="UNAUTHENTICATED") == 1


async def test_the_protocol_can_be_turned_off(make_server) -> None:
    server = await make_server("--oip.enabled", "false")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await Stub(channel).ServerLive(pb.ServerLiveRequest())
        assert info.value.code() == grpc.StatusCode.UNIMPLEMENTED
        with pytest.raises(grpc.aio.AioRpcError) as info:
            check = health_pb2.HealthCheckRequest(service="inference.GRPCInferenceService")
            await health_pb2_grpc.HealthStub(channel).Check(check)
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
