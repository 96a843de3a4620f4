"""Every Prometheus metric of cbam-serve, and the /metrics HTTP endpoint.

The names are a contract (docs/ARCHITECTURE.md): dashboards and alerts are written against them.
Each ``ServerMetrics`` has its own registry, so servers built in one process (tests) don't share counts.
Besides the cbam_* metrics, the conventional gRPC server metrics (go-grpc-prometheus' names, which
off-the-shelf gRPC dashboards and alerts read) for every service on the port; server/interceptors.py
records them. The endpoint answers in OpenMetrics when the scraper asks for it (Prometheus does), which
carries the exemplars (trace ids) of the latency histograms while tracing is on.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from server.errors import StartupError

__all__ = [
    "BATCH_SIZE_BUCKETS",
    "LATENCY_BUCKETS",
    "STAGES",
    "DROP_REASONS",
    "GpuCollector",
    "MetricsEndpoint",
    "ServerMetrics",
    "SupervisorMetrics",
    "WorkerExpositions",
]

_log = logging.getLogger(__name__)

# From 100 µs (one small image's postprocessing) to a minute (a large batch of a large model on CPU).
LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
STAGES = ("preprocess", "queue", "inference", "postprocess")
DROP_REASONS = ("deadline", "cancelled", "overloaded")
_GRPC_LABELS = ["grpc_type", "grpc_service", "grpc_method"]



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
        self.grpc_started = Counter(
            "grpc_server_started_total", "RPCs started on the server.", _GRPC_LABELS, registry=r
        )
        self.grpc_handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server, whatever their status.",
            [*_GRPC_LABELS, "grpc_code"], registry=r,
        )  # fmt: skip
        self.grpc_handling_seconds = Histogram(
            "grpc_server_handling_seconds", "Time from an RPC's start to its end, as the server saw it.",
            _GRPC_LABELS, buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.grpc_msg_received = Counter(
            "grpc_server_msg_received_total", "Messages received from clients.", _GRPC_LABELS, registry=r
        )
        self.grpc_msg_sent = Counter(
            "grpc_server_msg_sent_total", "Messages sent to clients.", _GRPC_LABELS, registry=r
        )
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

    def watch_gpus(self, read: Callable[[], Iterable[Any]]) -> None:
        """Report GPU utilisation and memory per device, read at every scrape (``GpuCollector``)."""
        self.registry.register(GpuCollector(read))


class GpuCollector(Collector):
    """cbam_gpu_utilization_ratio and cbam_gpu_memory_{used,total}_bytes per device, from ``read()``
    at each scrape: readings with ``device``, ``utilization`` (0..1, or None where only torch reports),
    ``memory_used_bytes`` and ``memory_total_bytes`` (server/gpu.py). A failing read leaves the GPU
    figures out of that scrape, not the scrape itself."""

    def __init__(self, read: Callable[[], Iterable[Any]]) -> None:
        self._read = read
        self._warned = False

    def describe(self) -> list:
        return []  # read only at scrape time: registering must not touch the GPU

    def collect(self) -> Iterable[GaugeMetricFamily]:
        utilization = GaugeMetricFamily(
            "cbam_gpu_utilization_ratio",
            "Share of the last sample period in which the GPU ran a kernel (NVML), 0 to 1.",
            labels=["device"],
        )
        device = ["device"]
        used = GaugeMetricFamily(
            "cbam_gpu_memory_used_bytes", "GPU memory in use on the device, by every process.", labels=device
        )
        total = GaugeMetricFamily("cbam_gpu_memory_total_bytes", "GPU memory of the device.", labels=device)
        try:
            readings = list(self._read())
        except Exception as exc:  # a GPU that cannot be read must not fail the whole scrape
            if not self._warned:
                self._warned = True
                _log.warning("cannot read the GPU figures", extra={"fields": {"error": repr(exc)}})
            readings = []
        for reading in readings:
            if reading.utilization is not None:
                utilization.add_metric([reading.device], reading.utilization)
            used.add_metric([reading.device], reading.memory_used_bytes)
            total.add_metric([reading.device], reading.memory_total_bytes)
        return [utilization, used, total]


class MetricsEndpoint:
    """The /metrics HTTP server, in a daemon thread. ``port`` is the bound port (useful with 0).
    It answers in the format the scraper asks for (OpenMetrics, with exemplars, or Prometheus text)."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._httpd: WSGIServer
        try:
            self._httpd, self._thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise StartupError("metrics.port", f"cannot listen on {host}:{port}: {exc.strerror}") from None
        self.port: int = self._httpd.server_port

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class SupervisorMetrics:
    """The supervisor's own metrics (``workers`` above 1); the workers' are added by WorkerExpositions."""

    WORKER_STATES = ("starting", "serving", "down")

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.workers = Gauge(
            "cbam_workers",
            "Worker processes by state: starting (not yet warm), serving, down (waiting to restart).",
            ["state"], registry=self.registry,
        )  # fmt: skip
        self.restarts = Counter(
            "cbam_worker_restarts", "Workers restarted after they died.", ["worker"], registry=self.registry
        )
        for state in self.WORKER_STATES:
            self.workers.labels(state)


class WorkerExpositions:
    """A collector that serves the metrics of every worker process as one endpoint's.

    At each scrape it reads every worker's own /metrics (a loopback port each) in OpenMetrics format,
    adds ``worker="i"`` to every sample and serves the lot; the endpoint then answers in the format the
    scraper asked for. Nothing is summed here: a worker's series stay its own, so a restarted worker is
    an ordinary counter reset of its own series, which rate() handles, where a sum would drop and read
    as a reset of the whole server; PromQL sums them (``sum without (worker)``; the dashboard's and the
    alerts' queries already aggregate with sum). Not prometheus_client's multiprocess mode: it drops
    exemplars and has no Info or callback gauges (cbam_model_info, the CUDA memory gauges).
    """

    def __init__(self, endpoints: Callable[[], list[tuple[str, int]]], timeout_s: float = 5.0) -> None:
        self._endpoints = endpoints  # () -> [(worker label, loopback port)]
        self._timeout_s = timeout_s
        self._pool = ThreadPoolExecutor(4, thread_name_prefix="worker-metrics")

    def collect(self) -> Iterator[Metric]:
        targets = self._endpoints()
        families: dict[str, Metric] = {}
        for label, text in zip((t[0] for t in targets), self._pool.map(self._read, targets), strict=True):
            try:
                read = list(text_string_to_metric_families(text)) if text is not None else []
            except ValueError as exc:  # not an exposition (it died mid-answer?): left out, not the rest
                fields = {"worker": label, "error": str(exc)}
                _log.warning("worker metrics unreadable", extra={"fields": fields})
                continue
            for family in read:
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(
                        family.name, family.documentation, family.type, family.unit
                    )
                merged.samples += [s._replace(labels={**s.labels, "worker": label}) for s in family.samples]
        return iter(families.values())

    def _read(self, target: tuple[str, int]) -> str | None:
        label, port = target
        request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": OPENMETRICS})
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                return response.read().decode()
        except OSError as exc:  # it died or is restarting: this scrape goes without its series
            _log.debug("worker metrics unreadable", extra={"fields": {"worker": label, "error": str(exc)}})
            return None
