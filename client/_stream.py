"""classify_stream's one loop, written once without I/O: Client and AsyncClient each drive a StreamRun
with their own calls, waits and flow-control window.

    run = StreamRun(options, max_inflight=32, deadline=d, retry_delay=client._retry_delay)
    while True:                                    # one gRPC stream per turn
        call = open ClassifyStream(requests: run.next_request(...) as the window allows)
        for response in call:  results, freed = run.answer(response); free a slot if freed; yield results
        on a normal end:       yield run.finish(); raise run.source_error if the input failed; stop
        on a broken stream:    failures, delay = run.interrupted(error); yield failures;
                               raise if delay is None, else wait delay and go round again

Inputs are taken one at a time, only when a slot of the window is free, so an endless source works in
constant memory. Each sent request stays in `unanswered` until its answer comes; when a stream breaks
with a retryable status those are sent again first on the next stream, so a resumed stream loses and
repeats nothing that was already answered.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import grpc

from cbam.v1 import inference_pb2

from ._base import RequestOptions, remaining
from ._errors import CbamError, InvalidArgumentError, error_from_code, item_error
from ._images import ImageInput
from ._messages import to_prediction
from ._types import StreamResult

__all__ = ["StreamRun"]

_END = object()


class StreamRun:
    """The state of one classify_stream across the gRPC streams it may take. Not thread-safe: a driver
    that reads answers and writes requests on two threads holds one lock around every call."""

    def __init__(
        self,
        options: RequestOptions,
        *,
        max_inflight: int,
        deadline: float | None,
        retry_delay: Callable[[CbamError, int, float | None], float | None],
    ) -> None:
        if max_inflight < 1:
            raise ValueError(f"max_inflight should be >= 1, got {max_inflight}")
        self.options = options
        self.max_inflight = max_inflight
        self.deadline = deadline
        self._retry_delay = retry_delay
        self._attempt = 1
        self._taken = 0  # inputs taken from the source so far: the next one's index
        self._unanswered: dict[str, tuple[int, inference_pb2.ClassifyRequest]] = {}
        self._sent_at: dict[str, float] = {}
        self._resend: list[tuple[int, inference_pb2.ClassifyRequest]] = []
        self._local_failures: list[StreamResult] = []
        self.source_error: Exception | None = None  # what the caller's iterable raised, if it did

    def timeout(self) -> float | None:
        """Seconds left for the next stream (None: no deadline)."""
        return remaining(self.deadline)

    # The request side: call for each free slot of the window.

    def resend(self) -> inference_pb2.ClassifyRequest | None:
        """The next request a broken stream left unanswered, or None."""
        if not self._resend:
            return None
        index, request = self._resend.pop(0)
        return self._sent(index, request)

    def admit(self, image: ImageInput) -> inference_pb2.ClassifyRequest | None:
        """The request for the next input, or None when the client cannot read it: that input fails
        alone, reported with the next answers, like a bad item."""
        index, self._taken = self._taken, self._taken + 1
        try:
            request = self.options.build(image, request_id=str(index))
        except (OSError, ValueError, TypeError) as exc:
            error = InvalidArgumentError(grpc.StatusCode.INVALID_ARGUMENT, f"input {index}: {exc}")
            self._local_failures.append(StreamResult(index, None, error, 0.0))
            return None
        return self._sent(index, request)

    def next_request(self, source: Iterator[ImageInput]) -> inference_pb2.ClassifyRequest | None:
        """resend(), else admit() the next input of a plain iterator; None when both are spent."""
        request = self.resend()
        while request is None and self.source_error is None:
            try:
                image = next(source, _END)
            except Exception as exc:
                self.source_failed(exc)
                return None
            if image is _END:
                return None
            request = self.admit(image)
        return request

    def source_failed(self, error: Exception) -> None:
        """The caller's iterable raised: send nothing more from it; the driver raises `error` once the
        requests already sent are answered, rather than gRPC's bare 'Exception iterating requests'."""
        self.source_error = error

    # The response side.

    def answer(self, response: inference_pb2.ClassifyStreamResponse) -> tuple[list[StreamResult], bool]:
        """The results to hand the caller now, and whether a slot of the window is free again."""
        entry = self._unanswered.pop(response.request_id, None)
        results = self._take_local_failures()
        if entry is None:  # an id this stream did not send
            return results, False
        self._attempt = 1  # progress: a later break is a new failure with its own retries
        latency = time.perf_counter() - self._sent_at.pop(response.request_id)
        error = item_error(response)
        prediction = None if error is not None else to_prediction(response.response)
        return [*results, StreamResult(entry[0], prediction, error, latency)], True

    def finish(self) -> list[StreamResult]:
        """The results still owed when a stream ends normally; an item it never answered (a server bug)
        fails rather than being lost."""
        error = error_from_code(grpc.StatusCode.UNKNOWN, "the stream ended without an answer for this item")
        unanswered = [StreamResult(index, None, error, 0.0) for index, _ in self._unanswered.values()]
        self._unanswered.clear()
        return self._take_local_failures() + unanswered

    def interrupted(self, error: CbamError) -> tuple[list[StreamResult], float | None]:
        """A stream broke with `error`: the results to hand the caller now, and the seconds to wait
        before resuming on a new stream (None: give up and raise `error`). Unanswered requests go
        first on the next stream, in input order."""
        self._resend = sorted(self._unanswered.values(), key=lambda entry: entry[0]) + self._resend
        self._unanswered.clear()
        self._sent_at.clear()
        delay = self._retry_delay(error, self._attempt, self.deadline)
        self._attempt += 1
        return self._take_local_failures(), delay

    def _sent(self, index: int, request: inference_pb2.ClassifyRequest) -> inference_pb2.ClassifyRequest:
        self._unanswered[request.request_id] = (index, request)
        self._sent_at[request.request_id] = time.perf_counter()
        return request

    def _take_local_failures(self) -> list[StreamResult]:
        failures, self._local_failures = self._local_failures, []
        return failures
