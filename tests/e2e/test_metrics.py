"""The live /metrics endpoint counts exactly what was asked of the server."""

from __future__ import annotations

import grpc
import pytest

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.backends import list_backends
from server.launcher import scrape


def test_counters_and_histograms_count_exactly(served, samples) -> None:
    before = scrape(served.metrics_url)  # the server is shared: what it counts from here on
    with grpc.insecure_channel(served.address) as ch:
        stub = inference_pb2_grpc.InferenceServiceStub(ch)
        for image, _ in samples[:5]:
            stub.Classify(pb.ClassifyRequest(encoded=image), timeout=30)
        for bad in (b"", b"garbage", b"\x89PNG\r\n\x1a\n broken"):  # preprocessed, then refused
            with pytest.raises(grpc.RpcError):
                stub.Classify(pb.ClassifyRequest(encoded=bad), timeout=30)
        for _ in range(2):  # refused before preprocessing
            with pytest.raises(grpc.RpcError):
                stub.Classify(pb.ClassifyRequest(encoded=samples[0][0], top_k=11), timeout=30)
        stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=30)
        items = [pb.ClassifyRequest(encoded=samples[1][0]), pb.ClassifyRequest(encoded=b"?"),
                 pb.ClassifyRequest(encoded=samples[2][0])]  # fmt: skip
        assert len(list(stub.ClassifyStream(iter(items), timeout=30))) == 3
    m = scrape(served.metrics_url)

    def value(name: str, **labels: str) -> float:
        return m.value(name, **labels) - before.value(name, **labels)

    calls = {("Classify", "OK"): 5, ("Classify", "INVALID_ARGUMENT"): 5,
             ("ClassifyStream", "OK"): 2, ("ClassifyStream", "INVALID_ARGUMENT"): 1}  # fmt: skip
    for (method, code), n in calls.items():
        assert value("cbam_requests_total", method=method, code=code) == n, (method, code)
        assert value("cbam_images_total", method=method, code=code) == n, (method, code)
        assert value("cbam_request_duration_seconds_count", method=method, code=code) == n
        assert value("cbam_request_duration_seconds_bucket", method=method, code=code, le="+Inf") == n
    assert value("cbam_requests_total", method="GetModelInfo", code="OK") == 1
    assert value("cbam_images_total", method="GetModelInfo", code="OK") == 0
    requests = [key for key in m if key[0] == "cbam_requests_total"]
    assert sum(m[key] - before.get(key, 0.0) for key in requests) == 14

    assert value("cbam_stage_duration_seconds_count", stage="preprocess") == 5 + 3 + 2 + 1
    assert value("cbam_stage_duration_seconds_count", stage="queue") == 7
    assert value("cbam_stage_duration_seconds_count", stage="postprocess") == 7
    batches = value("cbam_batch_size_count")
    assert value("cbam_batch_size_sum") == 7 and 1 <= batches <= 7
    assert value("cbam_stage_duration_seconds_count", stage="inference") == batches
    assert value("cbam_batch_size_bucket", le="1.0") <= batches == value("cbam_batch_size_bucket", le="+Inf")
    assert m.value("cbam_inflight_requests") == 0 and m.value("cbam_queue_depth") == 0
    for reason in ("deadline", "cancelled", "overloaded"):
        assert value("cbam_dropped_requests_total", reason=reason) == 0
    info = next(labels for (name, labels) in m if name == "cbam_model_info")
    assert dict(info) == {"arch": "cbam_resnet8_cifar", "version": dict(info)["version"], "device": "cpu",
                          "dtype": "float32", "backend": dict(info)["backend"]}  # fmt: skip
    assert dict(info)["backend"] in list_backends()
