"""The gRPC servicer: proto messages to plain types and back, and the one place where domain
exceptions become gRPC statuses. Every call (and every stream item) is counted and timed here.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.errors import (
    Expired,
    InvalidInput,
    OutOfMemory,
    Overloaded,
    ShuttingDown,
    TooLarge,
)
from server.metrics import ServerMetrics
from server.pipeline import InferencePipeline, Prediction, Query
from server.postprocess import AttentionFormat, AttentionKind, AttentionQuery
from server.preprocess import RawTensor

__all__ = ["InferenceServicer", "ParseRequests", "status_for", "to_query", "to_response"]

_log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
_DEADLINE_SLACK_S = 0.05
# Most specific first: TooLarge is an InvalidInput that is about size.
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Expired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
)
_TENSOR_DTYPES = {pb.Tensor.DTYPE_UINT8: "uint8", pb.Tensor.DTYPE_FLOAT32: "float32"}
_MAP_KINDS = {"channel": pb.ATTENTION_KIND_CHANNEL, "spatial": pb.ATTENTION_KIND_SPATIAL}


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a failure is answered with; anything unexpected is INTERNAL."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def to_query(request: pb.ClassifyRequest, request_id: str) -> Query:
    """Check and convert a ClassifyRequest. Raises InvalidInput naming the field that is wrong."""
    if len(request.request_id) > MAX_REQUEST_ID_CHARS:
        raise InvalidInput(
            f"request_id: {len(request.request_id)} characters, at most {MAX_REQUEST_ID_CHARS}"
        )
    which = request.WhichOneof("image")
    if which is None:
        raise InvalidInput("image: empty request; set image.encoded (an image file) or image.tensor")
    if which == "encoded":
        image: bytes | RawTensor = request.encoded
    else:
        tensor = request.tensor
        if tensor.dtype not in _TENSOR_DTYPES:
            name = "DTYPE_UNSPECIFIED (not set)" if tensor.dtype == 0 else f"unknown value {tensor.dtype}"
            raise InvalidInput(f"image.tensor.dtype: {name}; use DTYPE_UINT8 or DTYPE_FLOAT32")
        image = RawTensor(_TENSOR_DTYPES[tensor.dtype], tuple(tensor.shape), tensor.data)
    attention = request.attention
    try:
        kind = AttentionKind(attention.kind)
    except ValueError:
        raise InvalidInput(f"attention.kind: unknown value {attention.kind}; use 0..3 (NONE..BOTH)") from None
    try:
        fmt = AttentionFormat(attention.format)
    except ValueError:
        raise InvalidInput(
            f"attention.format: unknown value {attention.format}; use 0 (FLOAT16) or 1 (PNG)"
        ) from None
    return Query(
        request_id=request_id,
        image=image,
        top_k=request.top_k,
        attention=AttentionQuery(kind=kind, blocks=tuple(attention.blocks), format=fmt),
    )


def to_response(prediction: Prediction, out: pb.ClassifyResponse | None = None) -> pb.ClassifyResponse:
    """The wire form of a prediction, written into ``out`` (a fresh message by default). Filling the
    message in place costs a third of building it from keyword arguments and copying it into a parent."""
    out = pb.ClassifyResponse() if out is None else out
    out.request_id = prediction.request_id
    for score in prediction.labels:
        label = out.labels.add()
        label.index, label.name, label.probability = score.index, score.name, score.probability
    for m in prediction.attention:
        wire = out.attention.add()
        wire.block, wire.kind, wire.format, wire.data = m.block, _MAP_KINDS[m.kind], int(m.format), m.data
        wire.shape.extend(m.shape)
    out.model_version = prediction.model_version
    t, timings = prediction.timings, out.timings
    timings.preprocess_seconds = t.preprocess_seconds
    timings.queue_seconds = t.queue_seconds
    timings.inference_seconds = t.inference_seconds
    timings.postprocess_seconds = t.postprocess_seconds
    timings.batch_size = t.batch_size
    return out


def _cancelled_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: the deadline passed, or the client went away. (gRPC's deadline
    timer may fire a hair before time_remaining() reaches zero.)"""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


class _Stream:
    """One ClassifyStream call: its answers, and how many of its items are being handled."""

    END = object()  # the client closed its side and every item is answered
    DRAINED = object()  # the server is draining and every item taken is answered

    def __init__(self) -> None:
        self.answers: asyncio.Queue[object] = asyncio.Queue()
        self.pending = 0
        self.draining = False

    def drain(self) -> None:
        self.draining = True
        self.settle()

    def settle(self) -> None:
        if self.draining and self.pending == 0:
            self.answers.put_nowait(self.DRAINED)


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """cbam.v1.InferenceService over an InferencePipeline."""

    def __init__(
        self,
        pipeline: InferencePipeline,
        model_info: pb.ModelInfo,
        metrics: ServerMetrics,
        max_stream_inflight: int,
        max_batch_items: int,
    ) -> None:
        self._pipeline = pipeline
        self._model_info = model_info
        self._metrics = metrics
        self._max_stream_inflight = max_stream_inflight
        self._max_batch_items = max_batch_items
        self._draining = False
        self._active = 0  # calls and stream items taken and not yet answered
        self._last_arrival = 0.0
        self._streams: set[_Stream] = set()
        self._counted: dict[tuple[str, grpc.StatusCode], tuple] = {}  # (method, code) -> metric children

    @property
    def draining(self) -> bool:
        return self._draining

    def refuse_new_work(self) -> None:
        """Start draining: what was taken is finished; what comes now is refused with UNAVAILABLE.

        gRPC's own stop() would CANCEL the calls it has received but not yet handed to us
        (grpc/grpc#41785); answering them UNAVAILABLE first tells their clients to go elsewhere.
        Streams end with UNAVAILABLE once the items they sent before are answered.
        """
        self._draining = True
        for stream in list(self._streams):
            stream.drain()

    async def wait_drained(self, timeout: float, quiet: float = 0.05) -> None:
        """Wait (at most ``timeout`` s) until nothing taken is unanswered and, for up to a second
        more, until no call has arrived for ``quiet`` s (so gRPC has handed us what it holds)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.01)
        deadline = min(deadline, loop.time() + 1.0)
        while time.monotonic() - self._last_arrival < quiet and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        response, code, message = await self._classify_one(request, context, "Classify")
        if response is None:
            await context.abort(code, message)
        return response

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        # Items are handled concurrently (so they can share batches) and answered as each finishes;
        # at most max_stream_inflight are taken and not yet written back, after which we stop
        # reading (HTTP/2 flow control then holds the client back).
        stream = _Stream()
        slots = asyncio.Semaphore(self._max_stream_inflight)
        items: set[asyncio.Task[None]] = set()

        async def answer(request: pb.ClassifyRequest) -> None:
            response, code, message = await self._classify_one(request, context, "ClassifyStream")
            if response is not None:
                reply = pb.ClassifyStreamResponse(request_id=response.request_id, response=response)
            else:
                error = pb.ItemError(code=code.value[0], message=message)
                reply = pb.ClassifyStreamResponse(request_id=self._request_id(request), error=error)
            stream.answers.put_nowait(reply)
            stream.pending -= 1
            stream.settle()

        async def read_all() -> None:
            try:
                async for request in request_iterator:
                    await slots.acquire()
                    if stream.draining:  # not taken: the stream ends UNAVAILABLE instead
                        slots.release()
                        return
                    stream.pending += 1
                    task = asyncio.create_task(answer(request))
                    items.add(task)
                    task.add_done_callback(items.discard)
                if items:
                    await asyncio.gather(*items)
                stream.answers.put_nowait(stream.END)
            except Exception as exc:  # reading the requests failed: the call fails with it
                stream.answers.put_nowait(exc)

        self._streams.add(stream)
        if self._draining:
            stream.drain()
        reader = asyncio.create_task(read_all())
        try:
            while True:
                next_answer = await stream.answers.get()
                if next_answer is stream.END:
                    return
                if next_answer is stream.DRAINED:
                    await context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down")
                if isinstance(next_answer, Exception):
                    raise next_answer
                yield next_answer
                # Its slot frees only once the answer is written: a client that stops reading
                # stops us reading (and computing) its requests, instead of growing a backlog.
                slots.release()
        finally:
            self._streams.discard(stream)
            reader.cancel()
            for task in list(items):
                task.cancel()

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        started = self._last_arrival = time.monotonic()
        items = request.items
        code, message = grpc.StatusCode.OK, ""
        codes: list[grpc.StatusCode] = []
        self._metrics.inflight.inc()
        self._active += 1
        try:
            if self._draining:
                raise ShuttingDown("the server is shutting down; try another replica")
            if not items:
                raise InvalidInput("items: empty; send at least one image")
            if len(items) > self._max_batch_items:
                raise InvalidInput(
                    f"items: {len(items)} images, at most {self._max_batch_items} in one call "
                    "(limits.max_batch_items); split them over several calls"
                )
            remaining = context.time_remaining()
            deadline = None if remaining is None else started + remaining
            # A malformed item (to_query) fails in its place, like one the pipeline refuses.
            parsed: list[Query | InvalidInput] = []
            for item in items:
                try:
                    parsed.append(to_query(item, self._request_id(item)))
                except InvalidInput as exc:
                    parsed.append(exc)
            valid = [query for query in parsed if isinstance(query, Query)]
            outcomes = iter(await self._pipeline.classify_many(valid, deadline))
            response = pb.ClassifyBatchResponse()
            for item, query in zip(items, parsed, strict=True):
                outcome = query if isinstance(query, InvalidInput) else next(outcomes)
                result = response.results.add()
                result.request_id = item.request_id
                if isinstance(outcome, Prediction):
                    codes.append(grpc.StatusCode.OK)
                    to_response(outcome, result.response)
                else:
                    item_code, result.error.message = status_for(outcome)
                    result.error.code = item_code.value[0]
                    codes.append(item_code)
                    if item_code is grpc.StatusCode.INTERNAL:
                        _log.error("batch item failed", exc_info=outcome,
                                   extra={"fields": {"request_id": item.request_id}})  # fmt: skip
            return response
        except asyncio.CancelledError:
            code = _cancelled_status(context)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                _log.exception("request failed", extra={"fields": {"method": "ClassifyBatch"}})
        finally:
            self._active -= 1
            self._metrics.inflight.dec()
            self._record_batch(code, started, len(items), codes, message)
        await context.abort(code, message)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        self._metrics.requests.labels("GetModelInfo", "OK").inc()
        self._metrics.request_seconds.labels("GetModelInfo", "OK").observe(0.0)
        return self._model_info

    def _request_id(self, request: pb.ClassifyRequest) -> str:
        # Made up once per request message and remembered on it, so an error response carries it too.
        if not request.request_id:
            request.request_id = os.urandom(16).hex()  # as random as uuid4().hex, a fifth of the cost
        return request.request_id

    async def _classify_one(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, method: str
    ) -> tuple[pb.ClassifyResponse | None, grpc.StatusCode, str]:
        """Classify one request; returns (response, OK, "") or (None, status code, message)."""
        started = self._last_arrival = time.monotonic()
        code, message = grpc.StatusCode.OK, ""
        self._metrics.inflight.inc()
        self._active += 1
        try:
            if self._draining:
                raise ShuttingDown("the server is shutting down; try another replica")
            remaining = context.time_remaining()
            deadline = None if remaining is None else started + remaining
            request_id = self._request_id(request)
            prediction = await self._pipeline.classify(to_query(request, request_id), deadline)
            return to_response(prediction), code, message
        except asyncio.CancelledError:
            code = _cancelled_status(context)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                _log.exception("request failed", extra={"fields": {"request_id": request.request_id}})
            return None, code, message
        finally:
            self._active -= 1
            self._metrics.inflight.dec()
            self._record(method, code, started, request.request_id, message)

    def _record_batch(
        self,
        code: grpc.StatusCode,
        started: float,
        images: int,
        item_codes: list[grpc.StatusCode],
        message: str,
    ) -> None:
        """One ClassifyBatch call: the call by its status; its images by theirs (all the call's when
        it failed as a whole)."""
        method, seconds = "ClassifyBatch", time.monotonic() - started
        self._metrics.requests.labels(method, code.name).inc()
        self._metrics.request_seconds.labels(method, code.name).observe(seconds)
        counts: dict[grpc.StatusCode, int] = {}
        for item_code in item_codes or [code] * images:
            counts[item_code] = counts.get(item_code, 0) + 1
        for item_code, count in counts.items():
            self._metrics.images.labels(method, item_code.name).inc(count)
        fields = {"method": method, "code": code.name, "images": images, "seconds": round(seconds, 6)}
        if code is grpc.StatusCode.OK:
            if _log.isEnabledFor(logging.DEBUG):
                _log.debug(
                    "request",
                    extra={"fields": {**fields, "failed_items": len(item_codes) - counts.get(code, 0)}},
                )
        else:
            _log.info("request", extra={"fields": {**fields, "message": message}})

    def _record(
        self, method: str, code: grpc.StatusCode, started: float, request_id: str, message: str
    ) -> None:
        seconds = time.monotonic() - started
        counted = self._counted.get((method, code))
        if counted is None:  # looking a labelled child up costs a lock and a dict per metric: once
            name = code.name
            counted = self._counted[(method, code)] = (
                self._metrics.requests.labels(method, name),
                self._metrics.images.labels(method, name),
                self._metrics.request_seconds.labels(method, name),
            )
        requests, images, request_seconds = counted
        requests.inc()
        images.inc()
        request_seconds.observe(seconds)
        if code is grpc.StatusCode.OK and not _log.isEnabledFor(logging.DEBUG):
            return
        fields = {"request_id": request_id, "method": method, "code": code.name, "seconds": round(seconds, 6)}
        if code is grpc.StatusCode.OK:
            _log.debug("request", extra={"fields": fields})
        else:
            _log.info("request", extra={"fields": {**fields, "message": message}})


class ParseRequests(grpc.aio.ServerInterceptor):
    """Parses the requests of ``service`` here, so that bytes which are not a valid message get
    INVALID_ARGUMENT. gRPC's own deserialiser would answer UNKNOWN, naming a Python exception, and
    log an ERROR with a traceback for every such call: any client could flood the log."""

    def __init__(self, service: str) -> None:
        self._prefix = f"/{service}/"
        # method -> (its handler, wrapped): wrapped once, not on every call (bounded: our methods).
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        ours = details.method.startswith(self._prefix)
        if handler is None or handler.request_deserializer is None or not ours:
            return handler
        wrapped = self._wrapped.get(details.method)
        if wrapped is None or wrapped[0] is not handler:
            wrapped = self._wrapped[details.method] = (handler, _parsing(handler))
        return wrapped[1]


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    deserialize = handler.request_deserializer
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request"

    async def parse(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, or whatever else these bytes make the parser raise
            message = f"request: not a valid {name} message ({exc})"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    if not handler.request_streaming and not handler.response_streaming:

        async def unary(raw: bytes, context: grpc.aio.ServicerContext):
            return await handler.unary_unary(await parse(raw, context), context)

        make, behaviour = grpc.unary_unary_rpc_method_handler, unary
    elif handler.request_streaming and handler.response_streaming:

        async def stream(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
            async def requests():
                async for raw in raw_requests:
                    yield await parse(raw, context)

            async for response in handler.stream_stream(requests(), context):
                yield response

        make, behaviour = grpc.stream_stream_rpc_method_handler, stream
    else:  # cbam.v1 has no other kinds of call
        return handler
    return make(behaviour, request_deserializer=None, response_serializer=handler.response_serializer)
