"""What Client and AsyncClient share: connection settings, per-call options, deadlines (the stream loop
they share is in _stream.py)."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2_grpc

from cbam.v1 import inference_pb2, inference_pb2_grpc

from ._channel import DEFAULT_TARGET, ChannelSettings, TlsConfig, build_target
from ._errors import CbamError, InvalidArgumentError, item_error
from ._images import ImageInput
from ._messages import AttentionArg, FormatArg, build_request, to_prediction
from ._retry import RetryPolicy
from ._tracing import with_trace_context
from ._types import Prediction

__all__ = ["BatchCall", "ClientBase", "RequestOptions", "remaining"]


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

    def _call_metadata(self) -> tuple[tuple[str, str], ...]:
        """The metadata of one call: the token, and the caller's trace context when it has one."""
        return with_trace_context(self._metadata)

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
