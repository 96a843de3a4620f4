"""Every Prometheus metric of cbam-serve, and the /metrics HTTP endpoint.

The names are a contract (docs/ARCHITECTURE.md): dashboards and alerts are written against them.
Each ``ServerMetrics`` has its own registry, so servers built in one process (tests) don't share counts.
"""

from __future__ import annotations

from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "STAGES",
    "DROP_REASONS",
    "MetricsEndpoint",
    "ServerMetrics",
]

# From 100 µs (one small image's postprocessing) to a minute (a large batch of a large model on CPU).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("preprocess", "queue", "inference", "postprocess")
DROP_REASONS = ("deadline", "cancelled", "overloaded")


class ServerMetrics:
    """The metric objects of one server, registered in ``registry`` (a fresh one by default)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.request_seconds = Histogram(
            "cbam_request_duration_seconds", "End-to-end latency of one RPC (or one stream item).",
            ["method", "code"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.requests = Counter(
            "cbam_requests_total",
            "Requests (stream items one each, a ClassifyBatch call once) by final gRPC status code name.",
            ["method", "code"], registry=r,
        )  # fmt: skip
        self.images = Counter(
            "cbam_images_total", "Images classified or rejected.", ["method", "code"], registry=r
        )
        self.stage_seconds = Histogram(
            "cbam_stage_duration_seconds", "Time spent in one pipeline stage; inference once per batch.",
            ["stage"], buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "cbam_batch_size", "Requests per forward pass.", buckets=BATCH_SIZE_BUCKETS, registry=r
        )
        self.inflight = Gauge(
            "cbam_inflight_requests", "Requests being handled (accepted, not yet answered).", registry=r
        )
        self.queue_depth = Gauge("cbam_queue_depth", "Requests waiting in the batch queue.", registry=r)
        self.dropped = Counter(
            "cbam_dropped_requests_total", "Requests dropped before compute.", ["reason"], registry=r
        )
        self.model_info = Info("cbam_model", "What is served.", registry=r)  # exposed as cbam_model_info
        # Every stage and reason exists from the start, so rate() and dashboards see zeros, not gaps.
        for stage in STAGES:
            self.stage_seconds.labels(stage)
        for reason in DROP_REASONS:
            self.dropped.labels(reason)

    def describe_model(self, *, arch: str, version: str, device: str, dtype: str, backend: str) -> None:
        self.model_info.info(
            {"arch": arch, "version": version, "device": device, "dtype": dtype, "backend": backend}
        )

    def watch_cuda_memory(
        self, device: str, allocated: Callable[[], float], reserved: Callable[[], float]
    ) -> None:
        """Report CUDA memory of ``device``, read at every scrape."""
        Gauge(
            "cbam_cuda_memory_allocated_bytes",
            "CUDA memory held by tensors.",
            ["device"],
            registry=self.registry,
        ).labels(device).set_function(allocated)
        Gauge(
            "cbam_cuda_memory_reserved_bytes", "CUDA memory reserved by the caching allocator.", ["device"],
            registry=self.registry,
        ).labels(device).set_function(reserved)  # fmt: skip


class MetricsEndpoint:
    """The /metrics HTTP server, in a daemon thread. ``port`` is the bound port (useful with 0)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer
        self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)
