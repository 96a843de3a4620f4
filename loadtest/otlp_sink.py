"""A local OTLP/gRPC trace receiver: where cbam-serve's spans go when nothing else collects them.

    with OtlpSink() as sink:                      # keeps every span (tests)
        ... run cbam-serve with --tracing.endpoint sink.endpoint ...
        spans = sink.wait_for(lambda spans: len(spans) >= 3, timeout_s=30)

    python -m loadtest.otlp_sink [--port N]       # counts and drops (cbam-bench --tracing-cost): prints
                                                  # {"endpoint": ...} on its first line, its counts at SIGTERM

It serves opentelemetry.proto's TraceService/Export on loopback, in threads of its own, so whatever
event loop the caller runs is not involved.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.trace.v1 import trace_pb2

__all__ = ["OtlpSink", "main"]

_SERVICE = "opentelemetry.proto.collector.trace.v1.TraceService"


class OtlpSink:
    """An OTLP trace receiver on ``host``, port 0 (a free one) unless given. With ``keep`` it parses and
    keeps every span (``spans()``, with its resource's service.name in ``service_names``); without,
    it only counts requests and bytes, parsing nothing."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, keep: bool = True) -> None:
        self._keep = keep
        self._lock = threading.Condition()
        self._spans: list[trace_pb2.Span] = []
        self.service_names: set[str] = set()
        self.requests = 0
        self.bytes = 0
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        if keep:
            trace_service_pb2_grpc.add_TraceServiceServicer_to_server(_Keeper(self), self._server)
        else:
            export = grpc.unary_unary_rpc_method_handler(self._count)  # bytes in, bytes out
            handlers = grpc.method_handlers_generic_handler(_SERVICE, {"Export": export})
            self._server.add_generic_rpc_handlers((handlers,))
        self.port = self._server.add_insecure_port(f"{host}:{port}")
        self.endpoint = f"http://{host}:{self.port}"

    def __enter__(self) -> OtlpSink:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(grace=None)

    def spans(self) -> list[trace_pb2.Span]:
        with self._lock:
            return list(self._spans)

    def wait_for(
        self, condition: Callable[[list[trace_pb2.Span]], object], timeout_s: float
    ) -> list[trace_pb2.Span]:
        """The spans received, once ``condition(spans)`` holds; AssertionError after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while not condition(self._spans):
                left = deadline - time.monotonic()
                if left <= 0:
                    names = sorted({span.name for span in self._spans})
                    raise AssertionError(f"after {timeout_s}s, {len(self._spans)} spans received: {names}")
                self._lock.wait(left)
            return list(self._spans)

    def _add(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        with self._lock:
            self.requests += 1
            self.bytes += request.ByteSize()
            for resource_spans in request.resource_spans:
                for attribute in resource_spans.resource.attributes:
                    if attribute.key == "service.name":
                        self.service_names.add(attribute.value.string_value)
                for scope_spans in resource_spans.scope_spans:
                    self._spans.extend(scope_spans.spans)
            self._lock.notify_all()

    def _count(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.requests += 1
            self.bytes += len(request)
        return b""  # an empty ExportTraceServiceResponse: every span accepted


class _Keeper(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self, sink: OtlpSink) -> None:
        self._sink = sink

    def Export(self, request, context):  # noqa: N802 (the proto's name)
        self._sink._add(request)
        return trace_service_pb2.ExportTraceServiceResponse()


def main(argv: Sequence[str] | None = None) -> int:
    summary = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m loadtest.otlp_sink", description=summary)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free one (default)")
    args = parser.parse_args(argv)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with OtlpSink(args.host, args.port, keep=False) as sink:
        print(json.dumps({"endpoint": sink.endpoint}), flush=True)
        stop.wait()
    print(json.dumps({"export_requests": sink.requests, "bytes": sink.bytes}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
