"""The caller's trace context, sent with every call when OpenTelemetry is installed and a span is
active, so the server's spans join the caller's trace (W3C traceparent, or whatever OTEL_PROPAGATORS
configures). Without OpenTelemetry the client works the same and sends nothing more."""

from __future__ import annotations

try:
    from opentelemetry import propagate, trace
except ImportError:  # the client does not need OpenTelemetry
    propagate = trace = None

__all__ = ["with_trace_context"]

Metadata = tuple[tuple[str, str], ...]


def with_trace_context(metadata: Metadata) -> Metadata:
    """``metadata`` plus the current span's context, if there is one."""
    if trace is None or not trace.get_current_span().get_span_context().is_valid:
        return metadata
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return metadata + tuple(carrier.items())
