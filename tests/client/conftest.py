"""The scripted server of the client tests (the real cbam-serve is `live`, in tests/conftest.py): a
stand-in on a real loopback port for what the real server cannot be made to do on cue: fail with
UNAVAILABLE or RESOURCE_EXHAUSTED a set number of times, break a stream half way, and count every attempt.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest

from cbam.v1 import inference_pb2, inference_pb2_grpc


class ScriptedInference(inference_pb2_grpc.InferenceServiceServicer):
    """Fails the first calls with the codes in `failures`, then answers label "seven" for every image.

    `break_stream_after`: the first ClassifyStream call aborts with UNAVAILABLE after that many answers.
    `answer_in_groups_of`: ClassifyStream holds its answers until that many requests are unanswered, so a
    client that keeps fewer in flight waits for ever.
    An image whose encoded bytes are b"bad" gets an INVALID_ARGUMENT item error.
    """

    def __init__(self) -> None:
        self.failures: list[grpc.StatusCode] = []
        self.break_stream_after: int | None = None
        self.answer_in_groups_of = 1
        self.calls = 0
        self.stream_calls = 0
        self.received_ids: list[str] = []
        self.metadata: list[dict[str, str]] = []
        self.peers: list[str] = []  # the client's address and port of each call: its connection
        self._lock = threading.Lock()

    def _maybe_fail(self, context: grpc.ServicerContext) -> None:
        with self._lock:
            self.calls += 1
            self.metadata.append(dict(context.invocation_metadata()))
            self.peers.append(context.peer())
            code = self.failures.pop(0) if self.failures else None
        if code is not None:
            context.abort(code, f"scripted {code.name}")

    @staticmethod
    def _answer(request: inference_pb2.ClassifyRequest) -> inference_pb2.ClassifyResponse:
        return inference_pb2.ClassifyResponse(
            request_id=request.request_id,
            labels=[inference_pb2.Label(index=7, name="seven", probability=0.9)],
            model_version="scripted",
            timings=inference_pb2.Timings(batch_size=1),
        )

    def Classify(self, request, context):
        self._maybe_fail(context)
        if request.encoded == b"bad":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "image: cannot decode 3 bytes")
        return self._answer(request)

    def ClassifyStream(self, request_iterator, context) -> Iterator[inference_pb2.ClassifyStreamResponse]:
        self._maybe_fail(context)
        with self._lock:
            self.stream_calls += 1
            breaking = self.stream_calls == 1 and self.break_stream_after is not None
        held: list[inference_pb2.ClassifyRequest] = []
        for received, request in enumerate(request_iterator):
            if breaking and received == self.break_stream_after:
                context.abort(grpc.StatusCode.UNAVAILABLE, "scripted stream break")
            self.received_ids.append(request.request_id)
            held.append(request)
            if len(held) >= self.answer_in_groups_of:
                yield from map(self._stream_answer, held)
                held.clear()
        yield from map(self._stream_answer, held)

    def _stream_answer(self, request: inference_pb2.ClassifyRequest) -> inference_pb2.ClassifyStreamResponse:
        if request.encoded == b"bad":
            code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
            error = inference_pb2.ItemError(code=code, message="bad image")
            return inference_pb2.ClassifyStreamResponse(request_id=request.request_id, error=error)
        answer = self._answer(request)
        return inference_pb2.ClassifyStreamResponse(request_id=request.request_id, response=answer)

    def GetModelInfo(self, request, context):
        self._maybe_fail(context)
        return inference_pb2.ModelInfo(arch="scripted", labels=[str(i) for i in range(10)])


@pytest.fixture
def scripted():
    """(servicer, "127.0.0.1:PORT") of a ScriptedInference server running for one test."""
    servicer = ScriptedInference()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield servicer, f"127.0.0.1:{port}"
    server.stop(grace=None)
