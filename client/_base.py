"""What Client and AsyncClient share: connection settings, per-call options, deadlines, stream state."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from cbam.v1 import inference_pb2, inference_pb2_grpc

from ._channel import DEFAULT_TARGET, ChannelSettings, TlsConfig, build_target
from ._errors import CbamError, InvalidArgumentError, error_from_code, item_error
from ._images import ImageInput
from ._messages import AttentionArg, FormatArg, build_request, to_prediction
from ._retry import RetryPolicy
from ._types import Prediction, StreamResult

__all__ = ["BatchCall", "ClientBase", "RequestOptions", "StreamState"]


@dataclass(frozen=True)
class RequestOptions:
    """The per-request knobs of classify calls."""

    top_k: int = 0
    attention: AttentionArg | None = None
    attention_blocks: Sequence[str] | None = None
    attention_format: FormatArg = "float16"

    def build(self, image: ImageInput, request_id: str = "") -> inference_pb2.ClassifyRequest:
        return build_request(
            image,
            request_id=request_id,
            top_k=self.top_k,
            attention=self.attention,
            attention_blocks=self.attention_blocks,
            attention_format=self.attention_format,
        )


class BatchCall:
    """One classify_batch: the ClassifyBatch request for the inputs the client could read, and the
    answers put back in input order (an input it could not read fails alone, as on a stream)."""

    def __init__(self, options: RequestOptions, images: Iterable[ImageInput]) -> None:
        images = list(images)
        self.total = len(images)
        self.request = inference_pb2.ClassifyBatchRequest()
        self.sent: list[int] = []  # the input index of each item
        self.outcomes: dict[int, Prediction | CbamError] = {}
        for index, image in enumerate(images):
            try:
                self.request.items.append(options.build(image, request_id=str(index)))
            except (OSError, ValueError, TypeError) as exc:
                self.outcomes[index] = InvalidArgumentError(
                    grpc.StatusCode.INVALID_ARGUMENT, f"input {index}: {exc}"
                )
                continue
            self.sent.append(index)

    def results(
        self, response: inference_pb2.ClassifyBatchResponse | None, return_exceptions: bool
    ) -> list[Prediction | CbamError]:
        answers = response.results if response is not None else []
        if len(answers) != len(self.sent):
            raise ValueError(f"the server answered {len(answers)} of {len(self.sent)} images")
        for index, answer in zip(self.sent, answers, strict=True):
            self.outcomes[index] = item_error(answer) or to_prediction(answer.response)
        ordered = [self.outcomes[index] for index in range(self.total)]
        if not return_exceptions:
            for outcome in ordered:
                if isinstance(outcome, CbamError):
                    raise outcome
        return ordered


class ClientBase:
    def __init__(
        self,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        timeout: float | None = 30.0,
        retry: RetryPolicy | None = None,
        token: str | None = None,
        tls: TlsConfig | None = None,
        max_message_bytes: int = 64 * 1024 * 1024,
        keepalive_seconds: float | None = None,
        options: Sequence[tuple[str, object]] = (),
        connections: int = 1,
    ) -> None:
        if timeout is not None and timeout <= 0:
            raise ValueError(f"timeout should be > 0 seconds or None, got {timeout}")
        if connections < 1:
            raise ValueError(f"connections should be >= 1, got {connections}")
        self.target = build_target(target)
        self.timeout = timeout
        self.retry = retry if retry is not None else RetryPolicy()
        self._tls = tls
        self._settings = ChannelSettings(
            tls=tls,
            max_message_bytes=max_message_bytes,
            keepalive_seconds=keepalive_seconds,
            extra_options=tuple(options),
        )
        # Sent as metadata on every call, so a token works over plaintext loopback as well as over TLS.
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        credentials = tls.credentials() if tls is not None else None
        options = self._settings.options()
        if connections > 1:
            # Without a subchannel pool of its own, every channel to one address would share one
            # connection: gRPC pools subchannels process-wide by address and arguments.
            options.append(("grpc.use_local_subchannel_pool", 1))
        self._channels = [self._open_channel(self.target, options, credentials) for _ in range(connections)]
        self._stubs = itertools.cycle(
            [
                (inference_pb2_grpc.InferenceServiceStub(channel), health_pb2_grpc.HealthStub(channel))
                for channel in self._channels
            ]
        )

    @property
    def _stub(self) -> inference_pb2_grpc.InferenceServiceStub:
        """The next connection's stub: calls take the connections in turn."""
        return next(self._stubs)[0]

    @property
    def _health(self) -> health_pb2_grpc.HealthStub:
        return next(self._stubs)[1]

    @staticmethod
    def _open_channel(target: str, options: list, credentials: grpc.ChannelCredentials | None):
        """A grpc.Channel (Client) or grpc.aio.Channel (AsyncClient)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r}, tls={self._tls is not None})"

    def _deadline(self, timeout: float | None, default: float | None) -> float | None:
        seconds = default if timeout is None else timeout
        return None if seconds is None else time.monotonic() + seconds

    def _retry_delay(self, error: CbamError, attempt: int, deadline: float | None) -> float | None:
        """Seconds to wait before the next attempt, or None when the error should be raised now."""
        if not self.retry.should_retry(error.code, attempt):
            return None
        delay = self.retry.backoff_seconds(attempt)
        if deadline is not None and time.monotonic() + delay >= deadline:
            return None
        return delay


def remaining(deadline: float | None) -> float | None:
    return None if deadline is None else max(deadline - time.monotonic(), 0.0)


class StreamState:
    """Book-keeping of one classify_stream across the gRPC streams it may take.

    Requests are built lazily from the input as flow control allows. Each sent request stays in
    `unanswered` until its answer comes; if a stream fails with a retryable status, those are sent again
    first on the next stream, so a resumed stream loses and repeats nothing that was already answered.
    """

    def __init__(self, options: RequestOptions) -> None:
        self.options = options
        self.unanswered: dict[str, tuple[int, inference_pb2.ClassifyRequest]] = {}
        self.sent_at: dict[str, float] = {}
        self.resend: list[tuple[int, inference_pb2.ClassifyRequest]] = []
        self.local_failures: list[StreamResult] = []

    def next_request(self, source) -> inference_pb2.ClassifyRequest | None:
        """The next request to send (a resend first), or None when there is nothing left."""
        if self.resend:
            index, request = self.resend.pop(0)
        else:
            while True:
                try:
                    index, image = next(source)
                except StopIteration:
                    return None
                request = self.build(index, image)
                if request is not None:
                    break
        self.unanswered[request.request_id] = (index, request)
        self.sent_at[request.request_id] = time.perf_counter()
        return request

    def build(self, index: int, image: ImageInput) -> inference_pb2.ClassifyRequest | None:
        """The request for one input; an input the client cannot read fails alone, like a bad item."""
        try:
            return self.options.build(image, request_id=str(index))
        except (OSError, ValueError, TypeError) as exc:
            error = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"input {index}: {exc}")
            self.local_failures.append(StreamResult(index, None, error, 0.0))
            return None

    def answer(self, response: inference_pb2.ClassifyStreamResponse) -> StreamResult | None:
        """The result for one stream response, or None for an id this stream did not send."""
        entry = self.unanswered.pop(response.request_id, None)
        if entry is None:
            return None
        latency = time.perf_counter() - self.sent_at.pop(response.request_id)
        error = item_error(response)
        if error is not None:
            return StreamResult(entry[0], None, error, latency)
        return StreamResult(entry[0], to_prediction(response.response), None, latency)

    def prepare_resume(self) -> None:
        """Queue every unanswered request to be sent again, in input order."""
        self.resend = sorted(self.unanswered.values(), key=lambda entry: entry[0]) + self.resend
        self.unanswered.clear()
        self.sent_at.clear()

    def unanswered_failures(self) -> list[StreamResult]:
        """Failures for requests a stream ended without answering (a server bug, but never lose an item)."""
        error = error_from_code(grpc.StatusCode.UNKNOWN, "the stream ended without an answer for this item")
        failures = [StreamResult(index, None, error, 0.0) for index, _ in self.unanswered.values()]
        self.unanswered.clear()
        return failures

    def pending_failures(self) -> list[StreamResult]:
        failures, self.local_failures = self.local_failures, []
        return failures
