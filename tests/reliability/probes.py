"""Ways to ask a real cbam-serve things, shared by the reliability tests."""

from __future__ import annotations

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc

# Small enough that "oversized" costs little to build, large enough for every corpus image.
MAX_MESSAGE_BYTES = 2 * 1024 * 1024
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]


def stub_for(channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channel)


def model_info(address: str) -> pb.ModelInfo:
    with grpc.insecure_channel(address) as channel:
        return stub_for(channel).GetModelInfo(pb.GetModelInfoRequest(), timeout=10)


def health_status(address: str, service: str = "") -> str:
    with grpc.insecure_channel(address) as channel:
        request = health_pb2.HealthCheckRequest(service=service)
        reply = health_pb2_grpc.HealthStub(channel).Check(request, timeout=10)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def check_response(response: pb.ClassifyResponse, info: pb.ModelInfo, top_k: int = 0) -> None:
    """Whatever the input, an OK answer must be a well-formed prediction."""
    classes = len(info.labels)
    want = top_k or min(5, classes)
    assert len(response.labels) == want
    probabilities = np.array([label.probability for label in response.labels])
    assert np.isfinite(probabilities).all(), probabilities
    assert ((probabilities >= 0) & (probabilities <= 1 + 1e-6)).all(), probabilities
    assert (np.diff(probabilities) <= 1e-7).all(), "labels must come most probable first"
    assert probabilities.sum() <= 1 + 1e-4
    for label in response.labels:
        assert 0 <= label.index < classes and label.name == info.labels[label.index]
    assert response.model_version == info.version


def probabilities_of(response: pb.ClassifyResponse, classes: int) -> np.ndarray:
    """The full probability vector of a response that asked for top_k = number of classes."""
    out = np.zeros(classes)
    for label in response.labels:
        out[label.index] = label.probability
    return out
