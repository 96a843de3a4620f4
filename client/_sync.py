"""The blocking client."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Sequence

import grpc
from grpc_health.v1 import health_pb2

from cbam.v1 import inference_pb2

from ._base import BatchCall, ClientBase, RequestOptions, remaining
from ._errors import CbamError, error_from_rpc
from ._images import ImageInput
from ._messages import AttentionArg, FormatArg, to_model_info, to_prediction
from ._stream import StreamRun
from ._types import ModelInfo, Prediction, StreamResult

__all__ = ["Client"]


class Client(ClientBase):
    """A blocking client of cbam-serve.

        with Client("localhost:50051") as client:
            prediction = client.classify("cat.png", top_k=3, attention="spatial")

    `target` is "host:port", a gRPC URI ("dns:///name:port"), or several addresses (a list, or
    comma-separated) to balance over with round_robin. `timeout` is the default deadline of unary calls in
    seconds (streams have none unless given). Calls failing with UNAVAILABLE or RESOURCE_EXHAUSTED are
    retried as `retry` says. `token` is sent as "authorization: Bearer <token>"; `tls` turns on TLS.
    `connections` opens that many connections (to each address) and sends calls over them in turn: a
    connection reaches one worker of a cbam-serve with several (the kernel picks which), so a client that
    alone should keep them all busy needs several connections; a stream stays on one.
    """

    @staticmethod
    def _open_channel(target: str, options: list, credentials: grpc.ChannelCredentials | None):
        if credentials is None:
            return grpc.insecure_channel(target, options=options)
        return grpc.secure_channel(target, credentials, options=options)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """Close the connections; calls in flight are cancelled."""
        for channel in self._channels:
            channel.close()

    def classify(
        self,
        image: ImageInput,
        *,
        top_k: int = 0,
        attention: AttentionArg | None = None,
        attention_blocks: Sequence[str] | None = None,
        attention_format: FormatArg = "float16",
        request_id: str = "",
        timeout: float | None = None,
    ) -> Prediction:
        """Classify one image: a path, encoded bytes, a PIL image or a NumPy array.

        top_k 0 lets the server choose (5). attention: None, "channel", "spatial" or "both", for every
        block or the `attention_blocks` named; maps come back as float32 arrays whichever format carried
        them. Raises a CbamError subclass when the call fails.
        """
        options = RequestOptions(top_k, attention, attention_blocks, attention_format)
        request = options.build(image, request_id)
        return to_prediction(self._unary(self._stub.Classify, request, timeout))

    def classify_stream(
        self,
        images: Iterable[ImageInput],
        *,
        top_k: int = 0,
        attention: AttentionArg | None = None,
        attention_blocks: Sequence[str] | None = None,
        attention_format: FormatArg = "float16",
        max_inflight: int = 32,
        timeout: float | None = None,
    ) -> Iterator[StreamResult]:
        """Classify many images over one stream, yielding a StreamResult per image as each finishes.

        Results come in completion order; `StreamResult.index` is the image's position in `images`. A
        failed image (unreadable here or rejected by the server) yields a result with `error` set and the
        stream goes on. At most `max_inflight` images are on the wire at once, and `images` is read
        lazily. If the stream breaks with a retryable status, the unanswered images are sent again on a
        new stream. `timeout` bounds the whole stream. Raises CbamError if the stream itself fails.
        """
        run = StreamRun(
            RequestOptions(top_k, attention, attention_blocks, attention_format),
            max_inflight=max_inflight,
            deadline=self._deadline(timeout, None),
            retry_delay=self._retry_delay,
        )
        source = iter(images)
        lock = threading.Lock()  # the run is shared with gRPC's request thread
        while True:
            window = threading.Semaphore(max_inflight)
            closed = threading.Event()
            requests = self._requests(run, source, lock, window, closed)
            call = self._stub.ClassifyStream(requests, timeout=run.timeout(), metadata=self._call_metadata())
            try:
                for response in call:
                    with lock:
                        results, freed = run.answer(response)
                    if freed:
                        window.release()
                    yield from results
                with lock:
                    closed.set()
                    results = run.finish()
                yield from results
                if run.source_error is not None:
                    raise run.source_error
                return
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
            finally:
                closed.set()
                call.cancel()  # no-op once finished; stops the call if the caller stopped iterating
            with lock:
                failures, delay = run.interrupted(error)
            yield from failures
            if delay is None:
                raise error
            time.sleep(delay)

    def classify_many(
        self,
        images: Iterable[ImageInput],
        *,
        return_exceptions: bool = False,
        **kwargs,
    ) -> list[Prediction | CbamError]:
        """Classify many images over one stream and return their predictions in input order.

        A failed image raises its CbamError, or with return_exceptions=True takes its place in the list.
        Takes the keyword arguments of classify_stream.
        """
        results: dict[int, Prediction | CbamError] = {}
        for result in self.classify_stream(images, **kwargs):
            if result.error is not None and not return_exceptions:
                raise result.error
            results[result.index] = result.prediction if result.error is None else result.error
        return [results[index] for index in sorted(results)]

    def classify_batch(
        self,
        images: Iterable[ImageInput],
        *,
        top_k: int = 0,
        attention: AttentionArg | None = None,
        attention_blocks: Sequence[str] | None = None,
        attention_format: FormatArg = "float16",
        return_exceptions: bool = False,
        timeout: float | None = None,
    ) -> list[Prediction | CbamError]:
        """Classify several images in one ClassifyBatch call; predictions in input order.

        The cheapest way to send images you already hold: one call instead of one per image (the server
        takes up to ModelInfo.max_batch_items per call). A failed image raises its CbamError, or with
        return_exceptions=True takes its place in the list. The call is retried as a whole, as classify is.
        """
        call = BatchCall(RequestOptions(top_k, attention, attention_blocks, attention_format), images)
        response = self._unary(self._stub.ClassifyBatch, call.request, timeout) if call.sent else None
        return call.results(response, return_exceptions)

    def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """What the server is serving: architecture, labels, input size, attention blocks, batching."""
        request = inference_pb2.GetModelInfoRequest()
        return to_model_info(self._unary(self._stub.GetModelInfo, request, timeout))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The serving status of `service` ("" is the whole server): "SERVING", "NOT_SERVING", ..."""
        request = health_pb2.HealthCheckRequest(service=service)
        response = self._unary(self._health.Check, request, timeout)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    def _unary(self, method, request, timeout: float | None):
        deadline = self._deadline(timeout, self.timeout)
        attempt = 1
        while True:
            try:
                return method(request, timeout=remaining(deadline), metadata=self._call_metadata())
            except grpc.RpcError as exc:
                error = error_from_rpc(exc)
                delay = self._retry_delay(error, attempt, deadline)
                if delay is None:
                    raise error from None
            time.sleep(delay)
            attempt += 1

    @staticmethod
    def _requests(run: StreamRun, source, lock, window: threading.Semaphore, closed: threading.Event):
        # Runs in gRPC's request thread. The window keeps at most max_inflight requests unanswered; the
        # timeout only lets a stopped stream notice `closed`.
        while not closed.is_set():
            if not window.acquire(timeout=0.05):
                continue
            with lock:
                if closed.is_set():
                    return
                request = run.next_request(source)
            if request is None:
                return
            yield request
