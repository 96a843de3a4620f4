"""The cbam.v1 servicer: proto messages to plain types and back. What every call shares (drain,
status of a failure, metrics, logging) is server/calls.py's.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import AsyncIterator, Iterable

import grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.calls import Call, CallTracker, Failure, new_request_id, status_for
from server.errors import InvalidInput
from server.interceptors import HandlerCache, HandlerInterceptor, rebuild
from server.pipeline import InferencePipeline, Prediction, Query
from server.postprocess import AttentionFormat, AttentionKind, AttentionQuery
from server.preprocess import RawTensor

__all__ = ["InferenceServicer", "ParseRequests", "to_query", "to_response"]

_log = logging.getLogger(__name__)

MAX_REQUEST_ID_CHARS = 128
_TENSOR_DTYPES = {pb.Tensor.DTYPE_UINT8: "uint8", pb.Tensor.DTYPE_FLOAT32: "float32"}
_MAP_KINDS = {"channel": pb.ATTENTION_KIND_CHANNEL, "spatial": pb.ATTENTION_KIND_SPATIAL}


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


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    """cbam.v1.InferenceService over an InferencePipeline; ``calls`` does what every RPC shares."""

    def __init__(
        self,
        pipeline: InferencePipeline,
        model_info: pb.ModelInfo,
        calls: CallTracker,
        max_stream_inflight: int,
        max_batch_items: int,
    ) -> None:
        self._pipeline = pipeline
        self._model_info = model_info
        self._calls = calls
        self._max_stream_inflight = max_stream_inflight
        self._max_batch_items = max_batch_items

    async def Classify(
        self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyResponse:
        return await self._calls.unary("Classify", context, lambda call: self._classify(request, call))

    async def ClassifyStream(
        self, request_iterator: AsyncIterator[pb.ClassifyRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ClassifyStreamResponse]:
        limit = self._max_stream_inflight
        replies = self._calls.stream(
            "ClassifyStream", request_iterator, context, self._classify, _stream_reply, limit
        )
        async for reply in replies:
            yield reply

    async def ClassifyBatch(
        self, request: pb.ClassifyBatchRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClassifyBatchResponse:
        images = len(request.items)
        batch = self._classify_batch
        return await self._calls.unary("ClassifyBatch", context, lambda call: batch(request, call), images)

    async def GetModelInfo(
        self, request: pb.GetModelInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.ModelInfo:
        return await self._calls.unary("GetModelInfo", context, self._describe, images=0)

    async def _describe(self, call: Call) -> pb.ModelInfo:
        return self._model_info

    async def _classify(self, request: pb.ClassifyRequest, call: Call) -> pb.ClassifyResponse:
        call.request_id = _request_id(request)
        query = to_query(request, call.request_id)
        call.attention = query.attention.kind.name
        prediction = await self._pipeline.classify(query, call.deadline)
        call.batch_size = prediction.timings.batch_size
        return to_response(prediction)

    async def _classify_batch(self, request: pb.ClassifyBatchRequest, call: Call) -> pb.ClassifyBatchResponse:
        items = request.items
        if not items:
            raise InvalidInput("items: empty; send at least one image")
        if len(items) > self._max_batch_items:
            raise InvalidInput(
                f"items: {len(items)} images, at most {self._max_batch_items} in one call "
                "(limits.max_batch_items); split them over several calls"
            )
        # A malformed item (to_query) fails in its place, like one the pipeline refuses.
        parsed: list[Query | InvalidInput] = []
        for item in items:
            try:
                parsed.append(to_query(item, _request_id(item)))
            except InvalidInput as exc:
                parsed.append(exc)
        valid = [query for query in parsed if isinstance(query, Query)]
        outcomes = iter(await self._pipeline.classify_many(valid, call.deadline))
        response = pb.ClassifyBatchResponse()
        call.item_codes = []
        for item, query in zip(items, parsed, strict=True):
            outcome = query if isinstance(query, InvalidInput) else next(outcomes)
            result = response.results.add()
            result.request_id = item.request_id
            if isinstance(outcome, Prediction):
                call.item_codes.append(grpc.StatusCode.OK)
                to_response(outcome, result.response)
            else:
                item_code, result.error.message = status_for(outcome)
                result.error.code = item_code.value[0]
                call.item_codes.append(item_code)
                if item_code is grpc.StatusCode.INTERNAL:
                    _log.error("batch item failed", exc_info=outcome,
                               extra={"fields": {"request_id": item.request_id}})  # fmt: skip
        return response


def _request_id(request: pb.ClassifyRequest) -> str:
    # Made up once per request message and remembered on it, so an error response carries it too.
    if not request.request_id:
        request.request_id = new_request_id()
    return request.request_id


def _stream_reply(
    request: pb.ClassifyRequest, outcome: pb.ClassifyResponse | Failure
) -> pb.ClassifyStreamResponse:
    if isinstance(outcome, Failure):
        error = pb.ItemError(code=outcome.code.value[0], message=outcome.message)
        return pb.ClassifyStreamResponse(request_id=_request_id(request), error=error)
    return pb.ClassifyStreamResponse(request_id=outcome.request_id, response=outcome)


class ParseRequests(HandlerInterceptor):
    """Parses the requests of ``services`` here, so that bytes which are not a valid message get
    INVALID_ARGUMENT. gRPC's own deserialiser would answer UNKNOWN, naming a Python exception, and
    log an ERROR with a traceback for every such call: any client could flood the log."""

    def __init__(self, services: Iterable[str]) -> None:
        self._prefixes = tuple(f"/{service}/" for service in services)
        self._handlers = HandlerCache(lambda method, handler: _parsing(handler))

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        ours = details.method.startswith(self._prefixes)
        if handler.request_deserializer is None or not ours:
            return handler
        return self._handlers.get(details.method, handler)


def _parsing(handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    """``handler`` taking raw bytes and parsing them itself; any of the four kinds of call."""
    deserialize = handler.request_deserializer
    descriptor = getattr(getattr(deserialize, "__self__", None), "DESCRIPTOR", None)
    name = descriptor.full_name if descriptor is not None else "request"

    async def parse(raw: bytes, context: grpc.aio.ServicerContext):
        try:
            return deserialize(raw)
        except Exception as exc:  # DecodeError, or whatever else these bytes make the parser raise
            message = f"request: not a valid {name} message ({exc})"
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, message)

    async def each(raw_requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext):
        async for raw in raw_requests:
            yield await parse(raw, context)

    async def requests(raw, context: grpc.aio.ServicerContext):
        return each(raw, context) if handler.request_streaming else await parse(raw, context)

    if not handler.response_streaming:
        answer = handler.stream_unary if handler.request_streaming else handler.unary_unary

        async def unary(raw, context: grpc.aio.ServicerContext):
            return await answer(await requests(raw, context), context)

        return rebuild(handler, unary, request_deserializer=None)

    answers = handler.stream_stream if handler.request_streaming else handler.unary_stream
    # An async generator, or a coroutine that writes with context.write() (grpc's health Watch).
    generates = inspect.isasyncgenfunction(answers)

    async def stream(raw, context: grpc.aio.ServicerContext):
        request = await requests(raw, context)
        if not generates:
            await answers(request, context)
            return
        async for response in answers(request, context):
            yield response

    return rebuild(handler, stream, request_deserializer=None)
