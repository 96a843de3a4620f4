"""cbam-serve end to end, over a real socket: single calls, batching, streams, attention, reflection."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from models import DEFAULT_CHECKPOINT, load_checkpoint
from server.launcher import scrape
from server.preprocess import ImageSpec
from tests.reference import preprocess


def test_single_call_classifies_a_sample_digit(stub, samples) -> None:
    image, label = samples[0]
    response = stub.Classify(pb.ClassifyRequest(request_id="first", encoded=image, top_k=3), timeout=30)
    assert response.request_id == "first" and len(response.labels) == 3
    assert response.labels[0].name == label
    assert response.model_version and response.timings.inference_seconds > 0


def test_most_samples_are_right(stub, samples) -> None:
    responses = [
        stub.Classify(pb.ClassifyRequest(encoded=image, top_k=1), timeout=30) for image, _ in samples
    ]
    right = sum(r.labels[0].name == label for r, (_, label) in zip(responses, samples, strict=True))
    assert right >= 0.9 * len(samples)


def _batch_sizes(metrics_url: str) -> tuple[float, float]:
    samples = scrape(metrics_url)
    return samples[("cbam_batch_size_count", frozenset())], samples[("cbam_batch_size_sum", frozenset())]


def test_concurrent_calls_are_batched(served, stub, samples) -> None:
    count_before, sum_before = _batch_sizes(served.metrics_url)
    requests = [pb.ClassifyRequest(encoded=samples[i % len(samples)][0]) for i in range(48)]
    with ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda r: stub.Classify(r, timeout=30), requests))
    sizes = [r.timings.batch_size for r in responses]
    assert max(sizes) > 1, sizes
    count_after, sum_after = _batch_sizes(served.metrics_url)
    assert sum_after - sum_before == 48  # every request was computed exactly once...
    assert count_after - count_before < 48  # ...in fewer forward passes than requests


def test_stream_with_a_bad_item_in_the_middle(stub, samples) -> None:
    requests = [pb.ClassifyRequest(request_id=f"s{i}", encoded=samples[i][0]) for i in range(7)]
    requests[3] = pb.ClassifyRequest(request_id="s3", encoded=b"\xff\xd8\xff broken jpeg")
    answers = {a.request_id: a for a in stub.ClassifyStream(iter(requests), timeout=30)}
    assert sorted(answers) == [f"s{i}" for i in range(7)]
    assert answers["s3"].error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    for i in (0, 1, 2, 4, 5, 6):
        response = answers[f"s{i}"].response
        assert response.request_id == f"s{i}" and response.labels[0].name == samples[i][1]


@pytest.fixture(scope="module")
def reference():
    """The default model in this process, unbatched: what every server answer must equal."""
    model, meta = load_checkpoint(DEFAULT_CHECKPOINT)
    spec = ImageSpec(meta.input_size, meta.mean, meta.std, max_pixels=10**8)

    def run(image: bytes, blocks=None):
        with torch.inference_mode():
            return model.forward_with_attention(preprocess(image, spec).unsqueeze(0), blocks=blocks)

    return run


_ASKS = [
    pb.AttentionRequest(),
    pb.AttentionRequest(kind=pb.ATTENTION_KIND_CHANNEL),
    pb.AttentionRequest(kind=pb.ATTENTION_KIND_SPATIAL, blocks=["layer2.0"]),
    pb.AttentionRequest(kind=pb.ATTENTION_KIND_BOTH, format=pb.ATTENTION_FORMAT_PNG),
    pb.AttentionRequest(kind=pb.ATTENTION_KIND_BOTH, blocks=["layer3.0", "layer1.0"]),
]


def test_attention_on_and_off_in_one_batch_equal_unbatched_runs(stub, samples, reference) -> None:
    info = stub.GetModelInfo(pb.GetModelInfoRequest())
    blocks = list(info.attention_blocks)
    n = info.batching.max_batch_size  # a full batch closes at once, so all of them share it
    requests = [
        pb.ClassifyRequest(
            request_id=str(i), encoded=samples[i % len(samples)][0], top_k=10, attention=_ASKS[i % 5]
        )
        for i in range(n)
    ]
    with ThreadPoolExecutor(n) as pool:
        responses = list(pool.map(lambda r: stub.Classify(r, timeout=30), requests))
    assert max(r.timings.batch_size for r in responses) > 1
    for request, response in zip(requests, responses, strict=True):
        ask = request.attention
        logits, maps = reference(request.encoded)
        probabilities = torch.softmax(logits[0], 0)
        for label in response.labels:
            assert label.probability == pytest.approx(float(probabilities[label.index]), abs=1e-5)
        assert [label.index for label in response.labels] == torch.argsort(
            probabilities, descending=True
        ).tolist()

        kinds = {0: [], 1: ["channel"], 2: ["spatial"], 3: ["channel", "spatial"]}[ask.kind]
        wanted = [b for b in blocks if not ask.blocks or b in ask.blocks]
        expected = [(b, k) for b in wanted for k in kinds]
        got = [(m.block, {1: "channel", 2: "spatial"}[m.kind]) for m in response.attention]
        assert got == expected, (ask, got)
        for m in response.attention:
            truth = getattr(maps[m.block], {1: "channel", 2: "spatial"}[m.kind])[0].numpy()
            assert tuple(m.shape) == truth.shape and m.format == ask.format
            if m.format == pb.ATTENTION_FORMAT_FLOAT16:
                values = np.frombuffer(m.data, "<f2").reshape(truth.shape)
                np.testing.assert_allclose(values, truth, atol=2e-3)
            else:
                assert m.data.startswith(b"\x89PNG")


def test_a_call_through_reflection_alone(served) -> None:
    """As grpcurl does: no generated stubs, only what the server describes about itself."""
    with grpc.insecure_channel(served.address) as channel:
        reflect = reflection_pb2_grpc.ServerReflectionStub(channel)

        def ask(**kwargs) -> reflection_pb2.ServerReflectionResponse:
            return next(
                reflect.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(**kwargs)]))
            )

        services = [s.name for s in ask(list_services="").list_services_response.service]
        assert "cbam.v1.InferenceService" in services and "grpc.health.v1.Health" in services

        pool = descriptor_pool.DescriptorPool()  # empty: nothing from our generated modules
        files = ask(file_containing_symbol="cbam.v1.InferenceService").file_descriptor_response
        protos = [descriptor_pb2.FileDescriptorProto.FromString(raw) for raw in files.file_descriptor_proto]
        added: set[str] = set()
        while len(added) < len(protos):  # dependencies first
            for proto in protos:
                if proto.name not in added and all(d in added for d in proto.dependency):
                    pool.Add(proto)
                    added.add(proto.name)
        service = pool.FindServiceByName("cbam.v1.InferenceService")
        method = service.methods_by_name["Classify"]
        request_class = message_factory.GetMessageClass(method.input_type)
        response_class = message_factory.GetMessageClass(method.output_type)
        assert request_class is not pb.ClassifyRequest

        from models import SAMPLES_DIR

        image = sorted(SAMPLES_DIR.glob("digit7_*.png"))[0].read_bytes()
        classify = channel.unary_unary(
            f"/{service.full_name}/{method.name}",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = classify(request_class(request_id="reflected", encoded=image, top_k=1), timeout=30)
        assert response.request_id == "reflected" and response.labels[0].name == "7"
