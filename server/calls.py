"""What every RPC does around its own work, written once for every method of every protocol.

    calls = CallTracker(metrics)

    async def Classify(self, request, context):                      # a unary RPC
        return await self._calls.unary("Classify", context, lambda call: self._classify(request, call))

    def ClassifyStream(self, requests, context):                     # a stream of independent items
        return self._calls.stream("ClassifyStream", requests, context, self._classify, reply, limit)

A handler gets a ``Call`` (arrival time, deadline, request id) and returns its answer or raises. The
tracker, around it:
  - refuses the call with UNAVAILABLE while the server drains, and counts it in flight until answered
    (so a drain can wait for what was taken);
  - turns a CbamError into its status (``status_for``), anything else into INTERNAL, logged with its
    traceback; when gRPC cancels the handler, says whether the deadline passed or the client went away;
  - records cbam_requests_total, cbam_images_total and cbam_request_duration_seconds, and logs the
    call (DEBUG when OK, INFO otherwise); every line logged while it runs carries its request id;
  - with tracing on, describes the call on its span (the server span server/interceptors.py made for
    a unary call; a span of its own for a stream item): model, request id, attention asked for, batch
    size, status; and gives its latency the trace id as exemplar.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple, TypeVar

import grpc

from server.errors import (
    Expired,
    InvalidInput,
    NotFound,
    NotReady,
    OutOfMemory,
    Overloaded,
    ShuttingDown,
    TooLarge,
    Unsupported,
)
from server.interceptors import cancelled_status
from server.logs import bind_request, unbind_request
from server.metrics import ServerMetrics
from server.tracing import Tracing

__all__ = ["Call", "CallTracker", "Failure", "new_request_id", "status_for"]

_log = logging.getLogger(__name__)

Request = TypeVar("Request")
Response = TypeVar("Response")
Reply = TypeVar("Reply")

# Most specific first: TooLarge is an InvalidInput that is about size.
_STATUS: tuple[tuple[type[Exception], grpc.StatusCode], ...] = (
    (TooLarge, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (InvalidInput, grpc.StatusCode.INVALID_ARGUMENT),
    (Overloaded, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (OutOfMemory, grpc.StatusCode.RESOURCE_EXHAUSTED),
    (Expired, grpc.StatusCode.DEADLINE_EXCEEDED),
    (ShuttingDown, grpc.StatusCode.UNAVAILABLE),
    (NotReady, grpc.StatusCode.UNAVAILABLE),
    (NotFound, grpc.StatusCode.NOT_FOUND),
    (Unsupported, grpc.StatusCode.UNIMPLEMENTED),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status and message a failure is answered with; anything unexpected is INTERNAL."""
    for kind, code in _STATUS:
        if isinstance(exc, kind):
            return code, str(exc)
    return grpc.StatusCode.INTERNAL, f"internal error ({type(exc).__name__}); see the server log"


def new_request_id() -> str:
    return os.urandom(16).hex()  # as random as uuid4().hex, a fifth of the cost


class Failure(NamedTuple):
    """How a call (or a stream item) ended when it did not succeed."""

    code: grpc.StatusCode
    message: str


class Call:
    """One RPC, or one item of a stream, from arrival to answer.

    A handler may set ``request_id`` (for the log) and ``item_codes`` (one status per image, when
    the call's images can fail one by one; otherwise all ``images`` count with the call's status),
    and, for its span, ``attention`` (the kind of maps asked for) and ``batch_size`` (of its forward).
    """

    __slots__ = (
        "method", "started", "deadline", "request_id", "images", "item_codes", "attention", "batch_size",
        "span", "item",
    )  # fmt: skip

    def __init__(self, method: str, context: grpc.aio.ServicerContext, images: int = 1) -> None:
        self.method = method
        self.started = time.monotonic()
        remaining = context.time_remaining()
        self.deadline: float | None = None if remaining is None else self.started + remaining
        self.request_id = ""
        self.images = images
        self.item_codes: list[grpc.StatusCode] | None = None
        self.attention: str | None = None
        self.batch_size: int | None = None
        self.span: object | None = None  # with tracing on: the span this call is described on
        self.item = False  # one item of a stream (its span is its own)


class _Stream:
    """One streaming call: its answers, and how many of its items are being handled."""

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


class CallTracker:
    """Every call in flight on one server, whatever its service: accounting, drain, status, metrics."""

    def __init__(
        self,
        metrics: ServerMetrics,
        tracing: Tracing = Tracing.OFF,
        span_attributes: dict[str, str] | None = None,
    ) -> None:
        """``span_attributes`` go on every call's span (what is served)."""
        self._metrics = metrics
        self._tracing = tracing
        self._span_attributes = dict(span_attributes or {})
        self._draining = False
        self._active = 0  # calls and stream items taken and not yet answered
        self._last_arrival = 0.0
        self._refusals_released = asyncio.Event()  # cleared while refusals are held (hold_refusals)
        self._refusals_released.set()
        self._streams: set[_Stream] = set()
        # (method, code) -> metric children: looking a labelled child up costs a lock and a dict each.
        self._call_children: dict[tuple[str, grpc.StatusCode], tuple] = {}
        self._image_children: dict[tuple[str, grpc.StatusCode], object] = {}

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

    async def wait_drained(self, timeout: float) -> None:
        """Wait (at most ``timeout`` s) until every call and stream item taken is answered."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self._active and loop.time() < deadline:
            await asyncio.sleep(0.01)

    async def hold_refusals(self, timeout: float, quiet: float = 0.05) -> None:
        """From now on hold each refusal (the call waits, taken by us, unanswered) until
        ``release_refusals()``; return once no call has arrived for ``quiet`` s (at most ``timeout``).

        Why: gRPC's stop() sends GOAWAY and stops taking calls, and a call that has reached gRPC but
        not yet us is then CANCELLED (gRPC core drops calls still waiting for a handler), which a
        client cannot tell from "done or not?". A client answered UNAVAILABLE at once sends its retry
        straight back over the same connection, so under load there is always such a call. Held, each
        client's call sits with us, no new ones come, and stop() finds nothing waiting; released after
        the GOAWAY, they answer UNAVAILABLE and the retries go to a new connection (refused: the port
        is closed) or to another replica.
        """
        self._refusals_released.clear()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while time.monotonic() - self._last_arrival < quiet and loop.time() < deadline:
            await asyncio.sleep(0.01)

    def release_refusals(self) -> None:
        """Answer the held refusals (UNAVAILABLE) and refuse what comes next at once again."""
        self._refusals_released.set()

    async def answer(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handle: Callable[[Call], Awaitable[Response]],
        images: int = 1,
        *,
        item: bool = False,
        probe: bool = False,
    ) -> Response | Failure:
        """Run ``handle`` as one call of ``method`` carrying ``images`` images (or as one ``item``
        of a stream): its response, or the Failure it ended with. A ``probe`` (is the server live,
        ready?) is answered while draining too, as the health service is: its answer is what tells a
        client to go elsewhere."""
        call = Call(method, context, images)
        if not self._tracing.enabled:
            return await self._answer(call, context, handle, probe)
        call.item = item
        call.span = self._tracing.start_item_span(method) if item else self._tracing.current_span()
        with self._tracing.current(call.span):
            return await self._answer(call, context, handle, probe)

    async def _answer(
        self,
        call: Call,
        context: grpc.aio.ServicerContext,
        handle: Callable[[Call], Awaitable[Response]],
        probe: bool,
    ) -> Response | Failure:
        if not probe:  # a prober's polling would keep a drain from ever seeing callers go quiet
            self._last_arrival = call.started
        code, message = grpc.StatusCode.OK, ""
        self._metrics.inflight.inc()
        taken = probe or not self._draining
        self._active += taken
        bound = bind_request(call)
        try:
            if not taken:
                await self._refusals_released.wait()
                raise ShuttingDown("the server is shutting down; try another replica")
            return await handle(call)
        except asyncio.CancelledError:
            code = cancelled_status(context)
            raise
        except Exception as exc:
            code, message = status_for(exc)
            if code is grpc.StatusCode.INTERNAL:
                _log.exception("request failed", extra={"fields": {"method": call.method}})
            return Failure(code, message)
        finally:
            self._active -= taken
            self._metrics.inflight.dec()
            self._record(call, code, message)
            unbind_request(bound)

    async def unary(
        self,
        method: str,
        context: grpc.aio.ServicerContext,
        handle: Callable[[Call], Awaitable[Response]],
        images: int = 1,
        *,
        probe: bool = False,
    ) -> Response:
        """``answer``, for a unary RPC: a Failure aborts the call with its status."""
        outcome = await self.answer(method, context, handle, images, probe=probe)
        if isinstance(outcome, Failure):
            await context.abort(outcome.code, outcome.message)
        return outcome  # type: ignore[return-value]  # abort() raised otherwise

    async def stream(
        self,
        method: str,
        requests: AsyncIterator[Request],
        context: grpc.aio.ServicerContext,
        handle: Callable[[Request, Call], Awaitable[Response]],
        reply: Callable[[Request, Response | Failure], Reply],
        max_inflight: int,
    ) -> AsyncIterator[Reply]:
        """A bidirectional stream of independent items: each is a call of its own (``handle``), and
        its outcome goes back as ``reply(request, outcome)``, in the order they finish.

        Items are handled concurrently (so they can share batches); at most ``max_inflight`` are
        taken and not yet written back, after which the stream stops reading (HTTP/2 flow control
        then holds the client back). While draining, the stream ends UNAVAILABLE once every item
        it took is answered.
        """
        stream = _Stream()
        slots = asyncio.Semaphore(max_inflight)
        items: set[asyncio.Task[None]] = set()

        async def answer(request: Request) -> None:
            outcome = await self.answer(method, context, lambda call: handle(request, call), item=True)
            stream.answers.put_nowait(reply(request, outcome))
            stream.pending -= 1
            stream.settle()

        async def read_all() -> None:
            try:
                async for request in requests:
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

        self._last_arrival = time.monotonic()
        self._streams.add(stream)
        if self._draining:
            await self._refusals_released.wait()
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
                yield next_answer  # type: ignore[misc]
                # Its slot frees only once the answer is written: a client that stops reading
                # stops us reading (and computing) its requests, instead of growing a backlog.
                slots.release()
        finally:
            self._streams.discard(stream)
            reader.cancel()
            for task in list(items):
                task.cancel()

    def _record(self, call: Call, code: grpc.StatusCode, message: str) -> None:
        """The call by its status; its images by theirs (all the call's when it failed as a whole)."""
        seconds = time.monotonic() - call.started
        children = self._call_children.get((call.method, code))
        if children is None:
            name = code.name
            children = self._call_children[(call.method, code)] = (
                self._metrics.requests.labels(call.method, name),
                self._metrics.request_seconds.labels(call.method, name),
            )
        requests, request_seconds = children
        requests.inc()
        if call.span is None:
            request_seconds.observe(seconds)
        else:
            request_seconds.observe(seconds, self._tracing.exemplar(call.span))
            self._describe(call, code, message)
        if call.item_codes:
            counts: dict[grpc.StatusCode, int] = {}
            for item_code in call.item_codes:
                counts[item_code] = counts.get(item_code, 0) + 1
            for item_code, count in counts.items():
                self._images(call.method, item_code).inc(count)
        elif call.images:
            self._images(call.method, code).inc(call.images)
        if code is grpc.StatusCode.OK and not _log.isEnabledFor(logging.DEBUG):
            return
        fields = {"request_id": call.request_id, "method": call.method, "code": code.name,
                  "images": call.images, "seconds": round(seconds, 6)}  # fmt: skip
        if code is grpc.StatusCode.OK:
            failed = sum(1 for c in call.item_codes or () if c is not grpc.StatusCode.OK)
            _log.debug("request", extra={"fields": {**fields, "failed_items": failed}})
        else:
            _log.info("request", extra={"fields": {**fields, "message": message}})

    def _describe(self, call: Call, code: grpc.StatusCode, message: str) -> None:
        span = call.span
        span.set_attributes(self._span_attributes)  # type: ignore[attr-defined]
        attributes: dict[str, object] = {"cbam.images": call.images}
        if call.request_id:
            attributes["cbam.request_id"] = call.request_id
        if call.attention is not None:
            attributes["cbam.attention"] = call.attention
        if call.batch_size is not None:
            attributes["cbam.batch.size"] = call.batch_size
        span.set_attributes(attributes)  # type: ignore[attr-defined]
        if call.item:  # a stream item's span is ours to end; a call's, the interceptor's
            self._tracing.finish(span, code, message)

    def _images(self, method: str, code: grpc.StatusCode):
        child = self._image_children.get((method, code))
        if child is None:
            child = self._image_children[(method, code)] = self._metrics.images.labels(method, code.name)
        return child
