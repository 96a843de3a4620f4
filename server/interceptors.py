"""Wrapping gRPC method handlers, in one place: the four kinds of handler, and the telemetry that every
call on the port gets, whatever its service (cbam.v1, health, reflection).

    rebuild(handler, behaviour, request_deserializer=None)   # the same kind of handler, new behaviour
    HandlerInterceptor                                        # base: override handler_for(handler, details)
    TelemetryInterceptor(metrics, tracing)                    # first of the server's interceptors

TelemetryInterceptor is the outermost wrapper, so what the others answer (UNAUTHENTICATED from
server/auth.py, INVALID_ARGUMENT for an unparsable message from server/service.py) is counted too:
  - the conventional gRPC server metrics of go-grpc-prometheus and its dashboards:
    grpc_server_started_total, grpc_server_handled_total{grpc_code}, grpc_server_handling_seconds,
    grpc_server_msg_received_total, grpc_server_msg_sent_total, all by grpc_type, grpc_service and
    grpc_method (a method gRPC itself answers UNIMPLEMENTED never reaches a handler, and is not counted);
  - with tracing on, the SERVER span of the call (server/tracing.py), current while the call runs,
    and the trace id as the exemplar of its latency.

Why not opentelemetry-instrumentation-grpc's aio server interceptor for the span: it would be a second
wrapper of every call beside this one (it also wraps the servicer context in a proxy per call), and
(version 0.66b2) it records OK for a call that was cancelled, ran past its deadline, or raised: only
abort() and set_code() reach its span. This wrapper already knows each call's final status.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import nullcontext
from typing import Any, NamedTuple

import grpc

from server.metrics import ServerMetrics
from server.tracing import Tracing

__all__ = [
    "GRPC_CODE_NAMES",
    "HandlerCache",
    "HandlerInterceptor",
    "TelemetryInterceptor",
    "call_type",
    "cancelled_status",
    "rebuild",
]

# gRPC's deadline timer may fire a hair before time_remaining() reaches zero.
_DEADLINE_SLACK_S = 0.05


# grpc_code as go-grpc-prometheus writes it (Go's code names), so that off-the-shelf rules and
# dashboards (grpc_code=~"Unknown|Internal|Unavailable|...") match. cbam_* metrics keep gRPC's
# UPPER_CASE names in their own code label.
GRPC_CODE_NAMES = {
    code: "Canceled"
    if code is grpc.StatusCode.CANCELLED
    else code.name.title().replace("_", "").replace("Ok", "OK")
    for code in grpc.StatusCode
}


class _Kind(NamedTuple):
    behaviour: str  # the RpcMethodHandler attribute holding the behaviour
    make: Callable[..., grpc.RpcMethodHandler]
    grpc_type: str  # go-grpc-prometheus' name for it


# (request_streaming, response_streaming) -> kind
_KINDS = {
    (False, False): _Kind("unary_unary", grpc.unary_unary_rpc_method_handler, "unary"),
    (True, False): _Kind("stream_unary", grpc.stream_unary_rpc_method_handler, "client_stream"),
    (False, True): _Kind("unary_stream", grpc.unary_stream_rpc_method_handler, "server_stream"),
    (True, True): _Kind("stream_stream", grpc.stream_stream_rpc_method_handler, "bidi_stream"),
}
_KEEP: Any = object()


def _kind(handler: grpc.RpcMethodHandler) -> _Kind:
    return _KINDS[(bool(handler.request_streaming), bool(handler.response_streaming))]


def call_type(handler: grpc.RpcMethodHandler) -> str:
    """unary, client_stream, server_stream or bidi_stream."""
    return _kind(handler).grpc_type


def rebuild(
    handler: grpc.RpcMethodHandler, behaviour: Callable[..., Any], request_deserializer: Any = _KEEP
) -> grpc.RpcMethodHandler:
    """A handler of the same kind as ``handler`` running ``behaviour``, with the same response
    serialiser and (unless given) the same request deserialiser."""
    kind = _kind(handler)
    deserializer = handler.request_deserializer if request_deserializer is _KEEP else request_deserializer
    return kind.make(
        behaviour, request_deserializer=deserializer, response_serializer=handler.response_serializer
    )


class HandlerCache:
    """Each method's handler wrapped once, not on every call (bounded: the methods served), and again
    if gRPC hands over another handler for it. ``wrap(method, handler)`` makes the wrapped one."""

    def __init__(self, wrap: Callable[[str, grpc.RpcMethodHandler], grpc.RpcMethodHandler]) -> None:
        self._wrap = wrap
        self._wrapped: dict[str, tuple[grpc.RpcMethodHandler, grpc.RpcMethodHandler]] = {}

    def get(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        entry = self._wrapped.get(method)
        if entry is None or entry[0] is not handler:
            entry = self._wrapped[method] = (handler, self._wrap(method, handler))
        return entry[1]


class HandlerInterceptor(grpc.aio.ServerInterceptor):
    """A server interceptor that answers a call with the handler gRPC found for it or a wrapper of it.
    Subclasses say which in ``handler_for``; a method gRPC has no handler for is left to gRPC."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        return None if handler is None else self.handler_for(handler, details)

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        """The handler to run for the call ``details`` describes: ``handler`` itself, or a wrapper."""
        raise NotImplementedError


def cancelled_status(context: grpc.aio.ServicerContext) -> grpc.StatusCode:
    """Why gRPC cancelled a handler: the deadline passed, or the client went away."""
    remaining = context.time_remaining()
    expired = remaining is not None and remaining <= _DEADLINE_SLACK_S
    return grpc.StatusCode.DEADLINE_EXCEEDED if expired else grpc.StatusCode.CANCELLED


def _final_code(context: grpc.aio.ServicerContext, error: BaseException | None) -> grpc.StatusCode:
    """The status a call ended with: aborted or set (context.code()), else OK, or what gRPC answers
    for an exception the handler let out."""
    if isinstance(error, (asyncio.CancelledError, GeneratorExit)):  # GeneratorExit: a stream closed early
        return cancelled_status(context)
    code = context.code()
    if code is not None:
        return code
    return grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN


class _MethodTelemetry:
    """The metric children of one method (looked up once) and what each of its calls records."""

    def __init__(self, metrics: ServerMetrics, tracing: Tracing, full_method: str, grpc_type: str) -> None:
        service, _, method = full_method[1:].partition("/")
        labels = (grpc_type, service, method)
        self.full_method = full_method
        self.started = metrics.grpc_started.labels(*labels)
        self.received = metrics.grpc_msg_received.labels(*labels)
        self.sent = metrics.grpc_msg_sent.labels(*labels)
        self._seconds = metrics.grpc_handling_seconds.labels(*labels)
        self._handled_family = metrics.grpc_handled
        self._labels = labels
        self._handled: dict[grpc.StatusCode, Any] = {}
        self.tracing = tracing

    def begin(
        self, request: Any, context: grpc.aio.ServicerContext, streaming: bool
    ) -> tuple[Any, float, Any]:
        """A call starts: (its request, counted as received; when it began; its span or None)."""
        self.started.inc()
        if streaming:
            request = self._counted(request)
        else:
            self.received.inc()
        span = None
        if self.tracing.enabled:
            span = self.tracing.start_server_span(self.full_method, context.invocation_metadata())
        return request, time.perf_counter(), span

    async def _counted(self, requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
        async for request in requests:
            self.received.inc()
            yield request

    def end(
        self, began: float, span: Any, context: grpc.aio.ServicerContext, error: BaseException | None
    ) -> None:
        code = _final_code(context, error)
        handled = self._handled.get(code)
        if handled is None:
            handled = self._handled[code] = self._handled_family.labels(*self._labels, GRPC_CODE_NAMES[code])
        handled.inc()
        seconds = time.perf_counter() - began
        if span is None:
            self._seconds.observe(seconds)
            return
        self._seconds.observe(seconds, self.tracing.exemplar(span))
        details = context.details() if error is not None and code is not grpc.StatusCode.OK else ""
        self.tracing.finish(span, code, details or "")


class TelemetryInterceptor(HandlerInterceptor):
    """grpc_server_* metrics and (with tracing on) a server span for every call; put it first."""

    def __init__(self, metrics: ServerMetrics, tracing: Tracing = Tracing.OFF) -> None:
        self._metrics = metrics
        self._tracing = tracing
        self._handlers = HandlerCache(
            lambda method, handler: _observed(
                handler, _MethodTelemetry(metrics, tracing, method, call_type(handler))
            )
        )

    def expect(self, service: Any) -> None:
        """Create the series of every method of ``service`` (a ServiceDescriptor) now, so dashboards
        see zeros rather than nothing before its first call."""
        for method in service.methods:
            grpc_type = _KINDS[(method.client_streaming, method.server_streaming)].grpc_type
            labels = (grpc_type, service.full_name, method.name)
            for family in (self._metrics.grpc_started, self._metrics.grpc_msg_received,
                           self._metrics.grpc_msg_sent, self._metrics.grpc_handling_seconds):  # fmt: skip
                family.labels(*labels)
            self._metrics.grpc_handled.labels(*labels, GRPC_CODE_NAMES[grpc.StatusCode.OK])

    def handler_for(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler:
        return self._handlers.get(details.method, handler)


def _observed(handler: grpc.RpcMethodHandler, t: _MethodTelemetry) -> grpc.RpcMethodHandler:
    """``handler``, counted and (with tracing on) traced."""
    behaviour = getattr(handler, _kind(handler).behaviour)
    tracing = t.tracing
    # A response-streaming behaviour is an async generator, or a coroutine that writes its responses
    # with context.write() (grpc's health Watch; server/auth.py's refusal).
    generates = inspect.isasyncgenfunction(behaviour)

    if not handler.response_streaming:

        async def unary_response(request: Any, context: grpc.aio.ServicerContext) -> Any:
            request, began, span = t.begin(request, context, handler.request_streaming)
            error = None
            try:
                if span is None:
                    response = await behaviour(request, context)
                else:
                    with tracing.current(span):
                        response = await behaviour(request, context)
            except BaseException as exc:
                error = exc
                raise
            finally:
                t.end(began, span, context, error)
            t.sent.inc()
            return response

        return rebuild(handler, unary_response)

    async def stream_response(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        request, began, span = t.begin(request, context, handler.request_streaming)
        error = None
        try:
            with nullcontext() if span is None else tracing.current(span):
                if not generates:  # a coroutine that calls context.write() itself: not counted
                    await behaviour(request, context)
                    return
                async for response in behaviour(request, context):
                    t.sent.inc()
                    yield response
        except BaseException as exc:
            error = exc
            raise
        finally:
            t.end(began, span, context, error)

    return rebuild(handler, stream_response)
