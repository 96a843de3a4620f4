"""OpenTelemetry traces of cbam-serve, off unless ``tracing.enabled`` (or an OTLP endpoint variable).

    tracing = Tracing.start(settings.tracing)     # Tracing.OFF when off: nothing imported, nothing made
    if tracing.enabled: ...                       # the one thing the hot path does while it is off

What a traced request looks like (server/interceptors.py, calls.py, pipeline.py, batcher.py):

    cbam.v1.InferenceService/Classify   SERVER, child of the caller's context (W3C traceparent metadata)
      preprocess                        from the pipeline's own stage timing
      queue wait                        from the batcher's: enqueued -> its batch starts; linked to the batch
      postprocess                       from the pipeline's
    batch forward                       one per batch, child of its first traced request, linked to
                                        every traced request in it, cbam.batch.size
    (a ClassifyStream item is a "ClassifyStream item" span under the call's span, with the same children)

Stage spans are made after the fact from the monotonic times the server already takes (the same ones
its stage metrics observe), placed on the wall clock with one offset: no second clock runs. With
``stage_spans`` false they are events on the request span instead, which costs less.

The OpenTelemetry SDK reads the OTEL_* variables it defines itself (OTEL_SERVICE_NAME,
OTEL_RESOURCE_ATTRIBUTES, OTEL_TRACES_SAMPLER(_ARG), OTEL_EXPORTER_OTLP_* headers, certificates,
timeout, OTEL_BSP_* batching, OTEL_PROPAGATORS): that is the convention, and the exception to "nothing
below __main__ reads the environment". Settings given in ``tracing`` win over them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from server.config import Tracing as TracingSettings
from server.errors import StartupError

__all__ = ["Tracing"]

_log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "cbam-serve"
# The codes that make a server span an error (OpenTelemetry's semantic conventions for gRPC): the
# others are the caller's doing, and the server answered them correctly.
_SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


def _wall_ns(monotonic_s: float, offset_ns: int) -> int:
    return int(monotonic_s * 1e9) + offset_ns


def _clock_offset_ns() -> int:
    """Wall clock minus monotonic clock, now: turns the server's monotonic stage times into span times."""
    return time.time_ns() - time.monotonic_ns()


class Tracing:
    """The server's tracer, or nothing (``enabled`` False: every method is then never called)."""

    OFF: Tracing  # the disabled instance, set below

    def __init__(self, provider: Any = None, *, stage_spans: bool = True) -> None:
        self.enabled = provider is not None
        self.stage_spans = stage_spans
        self._provider = provider
        if provider is None:
            return
        from opentelemetry import propagate, trace
        from opentelemetry.trace import Link, SpanKind, Status, StatusCode

        self._trace, self._propagate = trace, propagate
        self._Link, self._SpanKind, self._Status, self._StatusCode = Link, SpanKind, Status, StatusCode
        self._tracer = provider.get_tracer("cbam-serve")

    @classmethod
    def start(cls, settings: TracingSettings) -> Tracing:
        """Tracing as ``settings`` say: exporting to the collector, or OFF. Raises StartupError when
        tracing is asked for but the tracing extra is not installed."""
        if not settings.enabled:
            return cls.OFF
        try:
            from opentelemetry.sdk.resources import SERVICE_NAME, Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
            from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

            exporter_class = _exporter_class(settings.protocol or "grpc")
        except ImportError as exc:
            raise StartupError(
                "tracing.enabled",
                f"tracing is on (tracing.enabled, or OTEL_EXPORTER_OTLP_ENDPOINT) but OpenTelemetry is "
                f"not installed ({exc.name} is missing): pip install 'cbam-serve[tracing]', or turn "
                "tracing off",
            ) from None
        resource = Resource.create({SERVICE_NAME: settings.service_name} if settings.service_name else {})
        if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
            resource = resource.merge(Resource({SERVICE_NAME: DEFAULT_SERVICE_NAME}))
        sampler = None  # the SDK's: OTEL_TRACES_SAMPLER, else parent-based always-on
        if settings.sample_ratio is not None:
            sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
        provider = TracerProvider(resource=resource, sampler=sampler)
        exporter = exporter_class(**({"endpoint": settings.endpoint} if settings.endpoint else {}))
        provider.add_span_processor(BatchSpanProcessor(exporter))
        _log.info(
            "tracing",
            extra={"fields": {"protocol": settings.protocol, "endpoint": settings.endpoint or "from OTEL_*",
                              "service_name": resource.attributes.get(SERVICE_NAME),
                              "sampler": provider.sampler.get_description()}},
        )  # fmt: skip
        return cls(provider, stage_spans=settings.stage_spans)

    def shutdown(self) -> None:
        """Export what is still buffered, then stop the exporter."""
        if self._provider is not None:
            self._provider.shutdown()

    # ---- spans of calls (server/interceptors.py, server/calls.py) ----

    def start_server_span(self, full_method: str, metadata: Iterable[tuple[str, Any]] | None) -> Any:
        """The SERVER span of one RPC (``/package.Service/Method``), continuing the caller's trace
        context from its metadata. Not yet current: ``current(span)`` makes it so."""
        service, _, method = full_method[1:].partition("/")
        carrier = {key: value for key, value in metadata or () if isinstance(value, str)}
        return self._tracer.start_span(
            full_method[1:],
            context=self._propagate.extract(carrier),
            kind=self._SpanKind.SERVER,
            attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": method},
        )

    def start_item_span(self, method: str) -> Any:
        """A span for one item of a stream, child of the stream's span."""
        return self._tracer.start_span(f"{method} item")

    def current(self, span: Any) -> Any:
        """A context manager making ``span`` the current span (the parent of what is made inside)."""
        return self._trace.use_span(span, record_exception=False, set_status_on_exception=False)

    def current_span(self) -> Any:
        return self._trace.get_current_span()

    def finish(self, span: Any, code: grpc.StatusCode, message: str = "") -> None:
        """End ``span`` with the gRPC status its call or item ended with."""
        span.set_attribute("rpc.grpc.status_code", code.value[0])
        if code in _SERVER_ERRORS:
            span.set_status(self._Status(self._StatusCode.ERROR, f"{code.name}: {message}"))
        span.end()

    def exemplar(self, span: Any) -> dict[str, str] | None:
        """``span``'s trace id, as a Prometheus exemplar; None when the span is not recorded."""
        context = span.get_span_context()
        if not context.trace_flags.sampled:
            return None
        return {"trace_id": format(context.trace_id, "032x")}

    def log_ids(self) -> dict[str, str] | None:
        """trace_id and span_id of the current span, for the log line being written."""
        context = self._trace.get_current_span().get_span_context()
        if not context.is_valid:
            return None
        return {"trace_id": format(context.trace_id, "032x"), "span_id": format(context.span_id, "016x")}

    # ---- stages (server/pipeline.py, server/batcher.py), from the times the server took ----

    def stage(self, name: str, started: float, ended: float) -> None:
        """One stage of the current request, from ``started`` to ``ended`` (time.monotonic() values)."""
        parent = self._trace.get_current_span()
        if not parent.is_recording():
            return
        offset = _clock_offset_ns()
        if self.stage_spans:
            self._tracer.start_span(name, start_time=_wall_ns(started, offset)).end(_wall_ns(ended, offset))
        else:
            parent.add_event(name, {"cbam.duration_s": ended - started}, timestamp=_wall_ns(started, offset))

    def batch(self, members: Sequence[tuple[Any, float]], started: float, ended: float, failed: bool) -> None:
        """A batch's forward, from ``started`` to ``ended``: ``members`` holds (request span, when it
        was queued) for each of its items. The batch span is a child of the first traced request
        (so it is kept whenever one of them is) and linked to every traced one; each traced request
        gets its queue wait, linked to the batch."""
        traced = [(span, queued) for span, queued in members if span is not None and span.is_recording()]
        if not traced:
            return
        offset = _clock_offset_ns()
        start_ns, end_ns = _wall_ns(started, offset), _wall_ns(ended, offset)
        links, seen = [], set()
        for span, _ in traced:
            context = span.get_span_context()
            if context.span_id not in seen:  # a ClassifyBatch call puts several items in one batch
                seen.add(context.span_id)
                links.append(self._Link(context))
        set_parent = self._trace.set_span_in_context
        forward = self._tracer.start_span(
            "batch forward",
            context=set_parent(traced[0][0]),
            links=links,
            start_time=start_ns,
            attributes={"cbam.batch.size": len(members)},
        )
        if failed:
            forward.set_status(self._Status(self._StatusCode.ERROR, "the batch failed"))
        forward.end(end_ns)
        to_batch = [self._Link(forward.get_span_context())]
        for span, queued in traced:
            if self.stage_spans:
                wait = self._tracer.start_span(
                    "queue wait",
                    context=set_parent(span),
                    links=to_batch,
                    start_time=_wall_ns(queued, offset),
                )
                wait.end(start_ns)
            else:
                span.add_event(
                    "queue wait", {"cbam.duration_s": started - queued}, timestamp=_wall_ns(queued, offset)
                )


Tracing.OFF = Tracing()


def _exporter_class(protocol: str) -> type:
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    else:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
    return OTLPSpanExporter
