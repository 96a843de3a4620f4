"""Assembles and runs cbam-serve: ``build_server(settings) -> (server, port)`` and ``serve(settings)``.

server, port = build_server(settings)   # model loaded, port bound, nothing running yet
await server.start()                     # NOT_SERVING -> warm-up -> SERVING
await server.stop(grace)                 # NOT_SERVING, finish in-flight and queued calls

One process serves here; with ``workers`` above 1, server/supervisor.py runs several such processes
(server/worker.py) on one port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager

import grpc
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection, reflection_pb2

from cbam.oip import grpc_service_pb2 as oip_pb
from cbam.oip import grpc_service_pb2_grpc
from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.calls import CallTracker
from server.config import Settings, Tls
from server.errors import StartupError
from server.gpu import gpu_reader
from server.interceptors import TelemetryInterceptor
from server.logs import include_trace_ids
from server.metrics import MetricsEndpoint, ServerMetrics
from server.pipeline import InferencePipeline
from server.protocols import oip
from server.runner import ModelDescription, ModelRunner
from server.service import InferenceServicer, ParseRequests
from server.tracing import Tracing
from server.tuning import configure_malloc, configure_torch_threads

__all__ = ["InferenceServer", "build_server", "plaintext_warning", "serve"]

_log = logging.getLogger(__name__)
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["InferenceService"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name


class InferenceServer:
    """A built cbam-serve: the gRPC server, its pipeline, health and metrics. Start and stop it."""

    def __init__(
        self,
        settings: Settings,
        grpc_server: grpc.aio.Server,
        pipeline: InferencePipeline,
        calls: CallTracker,
        health: HealthServicer,
        metrics: ServerMetrics,
        port: int,
        model_info: pb.ModelInfo,
        tracing: Tracing = Tracing.OFF,
        services: tuple[str, ...] = (SERVICE_NAME,),
    ) -> None:
        self.settings = settings
        self.services = services  # the inference services served, each with its health status
        self.grpc_server = grpc_server
        self.pipeline = pipeline
        self.calls = calls
        self.health = health
        self.metrics = metrics
        self.port = port
        # What GetModelInfo answers; a worker updates its `workers` as the supervisor reports them.
        self.model_info = model_info
        self.tracing = tracing
        self.metrics_port: int | None = None
        self._metrics_endpoint: MetricsEndpoint | None = None

    async def start(self, *, serving: bool = True) -> None:
        """Accept calls, warm up (health NOT_SERVING meanwhile), then report SERVING; with ``serving``
        False, stay NOT_SERVING until ``set_serving(True)`` (a worker waits for the others)."""
        for name in ("", *self.services):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        if self.settings.metrics.enabled:
            m = self.settings.metrics
            self._metrics_endpoint = MetricsEndpoint(self.metrics.registry, m.host, m.port)
            self.metrics_port = self._metrics_endpoint.port
        await self.grpc_server.start()
        self.pipeline.start()
        await self.pipeline.warm_up()
        if serving:
            self.model_info.workers[0].ready = True
            await self.set_serving(True)
        d = self.pipeline.description
        fields = {
            "port": self.port,
            "metrics_port": self.metrics_port,
            "arch": d.arch,
            "version": d.version,
            "device": d.device,
            "dtype": d.dtype,
            "backend": d.backend,
            "max_batch_size": self.settings.batching.max_batch_size,
            "torch_threads": torch.get_num_threads(),
            "torch_interop_threads": torch.get_num_interop_threads(),
            "preprocess_threads": self.pipeline.preprocess_threads,
        }
        _log.info("serving" if serving else "warmed up", extra={"fields": fields})

    async def set_serving(self, serving: bool) -> None:
        """Health SERVING or NOT_SERVING for every service; ignored once draining."""
        statuses = health_pb2.HealthCheckResponse
        status = statuses.SERVING if serving else statuses.NOT_SERVING
        for name in ("", *self.services):
            await self.health.set(name, status)

    async def stop(
        self,
        grace: float | None = None,
        *,
        close_turn: Callable[[float], AbstractAsyncContextManager[None]] | None = None,
    ) -> None:
        """Drain, then stop. ``grace`` (settings.grace_seconds by default) bounds the wait for what
        was already taken; anything still running after it is cancelled.

        1. health NOT_SERVING for every service, then ``drain_delay_seconds`` of normal serving;
        2. new calls (and new stream items) are answered UNAVAILABLE, while everything taken
           (preprocessing, queued, computing) is finished: the batcher runs until its queue is empty;
        3. refusals are held until no call has come for a moment (CallTracker.hold_refusals says
           why), then gRPC sends GOAWAY and stops accepting, the held calls are answered
           UNAVAILABLE, and the inference threads and /metrics endpoint close.

        A worker holds its refusals until ``close_turn(timeout)`` lets it close: the workers close
        their ports one after another, each once the calls of those closed before it (whose clients
        reconnect to the port, so to a worker still open) have come and gone quiet. Were two to close
        at once, calls reconnecting from one could reach the other as it closes, and be CANCELLED.
        """
        grace = self.settings.grace_seconds if grace is None else grace
        _log.info("draining", extra={"fields": {"grace_seconds": grace}})
        await self.health.enter_graceful_shutdown()
        if self.settings.drain_delay_seconds:
            await asyncio.sleep(self.settings.drain_delay_seconds)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        self.calls.refuse_new_work()
        await self.calls.wait_drained(timeout=grace)
        await self.calls.hold_refusals(timeout=min(1.0, max(0.0, deadline - loop.time())))
        remaining = max(0.0, deadline - loop.time())
        async with contextlib.nullcontext() if close_turn is None else close_turn(remaining):
            if close_turn is not None:  # what the workers closed before this one sent here
                await self.calls.hold_refusals(timeout=min(1.0, max(0.0, deadline - loop.time())))
            stopping = asyncio.create_task(self.grpc_server.stop(max(0.0, deadline - loop.time())))
            await asyncio.sleep(0)  # stop()'s first step: GOAWAY, and gRPC takes no more calls
        self.calls.release_refusals()
        await stopping
        await self.pipeline.close()
        if self._metrics_endpoint is not None:
            self._metrics_endpoint.close()
        if self.tracing.enabled:
            include_trace_ids(None)
            self.tracing.shutdown()  # exports the spans still buffered
        _log.info("stopped", extra={"fields": {}})


def build_server(
    settings: Settings, *, runner: ModelRunner | None = None, share_port: bool = False
) -> tuple[InferenceServer, int]:
    """Load the model and bind the port (0 picks a free one); call within a running event loop.

    ``runner`` replaces the model that settings.model describes: a seam for tests, not a setting.
    ``share_port``: bind with SO_REUSEPORT, beside the other workers of one supervisor (which has
    already made sure no independent server holds the port).
    """
    configure_torch_threads()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    configure_malloc()
    tracing = Tracing.start(settings.tracing)
    if tracing.enabled:
        include_trace_ids(tracing.log_ids)
    metrics = ServerMetrics()
    if runner is None:
        runner = ModelRunner.from_settings(settings.model, settings.batching.max_batch_size)
    if settings.debug.fail_batch_on_sigusr1:
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, runner.fail_next_forward)
    d = runner.description
    metrics.describe_model(arch=d.arch, version=d.version, device=d.device, dtype=d.dtype, backend=d.backend)
    if runner.device.type == "cuda":
        device = runner.device
        metrics.watch_cuda_memory(
            str(device),
            lambda: torch.cuda.memory_allocated(device),
            lambda: torch.cuda.memory_reserved(device),
        )
    if (read_gpu := gpu_reader(runner.device)) is not None:
        metrics.watch_gpus(read_gpu)
    pipeline = InferencePipeline(runner, settings, metrics, tracing)

    limits = settings.limits
    # First, so it wraps the others: what they refuse is counted and traced too.
    telemetry = TelemetryInterceptor(metrics, tracing)
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", -1),
            ("grpc.max_concurrent_streams", limits.max_concurrent_streams),
            # gRPC core's own defaults (1,000, and 3,000 at most) CANCEL calls that arrive faster than
            # the event loop takes them up, before any handler could refuse them with a reason: a burst
            # of 10x the batch queue lost two thirds of its calls. A soft limit equal to the hard one
            # turns off its random early drops below it.
            ("grpc.server.max_pending_requests", limits.max_pending_calls),
            ("grpc.server.max_pending_requests_hard_limit", limits.max_pending_calls),
            # A second server on the same port must fail, not share it; workers share it on purpose.
            ("grpc.so_reuseport", 1 if share_port else 0),
        ],
        maximum_concurrent_rpcs=limits.max_concurrent_rpcs,
        interceptors=[telemetry, *_interceptors(settings, metrics, _inference_services(settings))],
    )
    calls = CallTracker(metrics, tracing, {"cbam.model.arch": d.arch, "cbam.model.version": d.version})
    model_info = _model_info(d, settings)
    servicer = InferenceServicer(
        pipeline, model_info, calls, limits.max_stream_inflight, limits.max_batch_items
    )
    inference_pb2_grpc.add_InferenceServiceServicer_to_server(servicer, server)
    health = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    services: tuple[str, ...] = (SERVICE_NAME,)
    if settings.oip.enabled:
        serving = _serving(health, oip.SERVICE_NAME)
        oip_servicer = oip.OipServicer(pipeline, calls, metrics, settings, serving)
        grpc_service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(oip_servicer, server)
        services += (oip.SERVICE_NAME,)
        telemetry.expect(oip_pb.DESCRIPTOR.services_by_name["GRPCInferenceService"])
    if settings.reflection:
        names = (
            *services,
            HEALTH_SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(names, server)
        telemetry.expect(reflection_pb2.DESCRIPTOR.services_by_name["ServerReflection"])
    telemetry.expect(pb.DESCRIPTOR.services_by_name["InferenceService"])
    telemetry.expect(health_pb2.DESCRIPTOR.services_by_name["Health"])
    address = f"{settings.host}:{settings.port}"
    port = _add_port(server, address, settings)
    if (warning := plaintext_warning(settings)) is not None:
        _log.warning(warning, extra={"fields": {"host": settings.host, "port": port}})
    built = InferenceServer(
        settings, server, pipeline, calls, health, metrics, port, model_info, tracing, services
    )
    return built, port


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain gracefully."""
    server, _ = build_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await server.start()
    except BaseException:
        await server.stop(0)
        raise
    await stop.wait()
    await server.stop()


def _model_info(d: ModelDescription, settings: Settings) -> pb.ModelInfo:
    return pb.ModelInfo(
        arch=d.arch,
        version=d.version,
        labels=d.labels,
        input_height=d.input_size[0],
        input_width=d.input_size[1],
        mean=d.mean,
        std=d.std,
        device=d.device,
        dtype=d.dtype,
        backend=d.backend,
        attention_blocks=d.attention_blocks,
        batching=pb.BatchingInfo(
            max_batch_size=settings.batching.max_batch_size,
            max_batch_delay_ms=settings.batching.max_batch_delay_ms,
            max_queue=settings.batching.max_queue,
        ),
        num_parameters=d.num_parameters,
        max_image_pixels=settings.limits.max_image_pixels,
        max_message_bytes=settings.limits.max_message_bytes,
        max_batch_items=settings.limits.max_batch_items,
        # This process alone; a worker's list is replaced by the supervisor's view of every worker.
        workers=[pb.WorkerInfo(index=0, pid=os.getpid())],
        worker=0,
    )


def _add_port(server: grpc.aio.Server, address: str, settings: Settings) -> int:
    try:
        if settings.tls.enabled:
            return server.add_secure_port(address, _server_credentials(settings.tls))
        return server.add_insecure_port(address)
    except RuntimeError as exc:  # grpc's "Failed to bind to address ..."
        raise StartupError("port", f"cannot listen on {address} (in use, or not an address here)") from exc


def _server_credentials(tls: Tls) -> grpc.ServerCredentials:
    """Read and check the PEM files now, so a bad one stops the start (naming it) rather than
    failing every handshake later while health says SERVING."""
    assert tls.cert_file is not None and tls.key_file is not None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    for field, path in (("tls.cert_file", tls.cert_file), ("tls.client_ca_file", tls.client_ca_file)):
        if path is not None:
            try:
                context.load_verify_locations(cafile=str(path))
            except (ssl.SSLError, OSError) as exc:
                raise StartupError(field, f"{path} holds no usable PEM certificate: {exc}") from None
    try:
        context.load_cert_chain(str(tls.cert_file), str(tls.key_file))
    except (ssl.SSLError, OSError) as exc:
        raise StartupError(
            "tls.key_file", f"{tls.key_file} is not a usable PEM key for {tls.cert_file}: {exc}"
        ) from None
    return grpc.ssl_server_credentials(
        [(tls.key_file.read_bytes(), tls.cert_file.read_bytes())],
        root_certificates=tls.client_ca_file.read_bytes() if tls.client_ca_file else None,
        require_client_auth=tls.client_auth_required,
    )


def plaintext_warning(settings: Settings) -> str | None:
    """A warning when calls would travel in plaintext beyond this machine, else None."""
    if settings.tls.enabled:
        return None
    host = settings.host.strip("[]")
    if host == "localhost" or host == "::1" or host.startswith("127."):
        return None
    return (
        f"serving plaintext gRPC on {settings.host}: without tls.cert_file and tls.key_file, "
        "requests and images travel unencrypted beyond this machine"
    )


def _inference_services(settings: Settings) -> tuple[str, ...]:
    """The services behind authentication and request parsing (health and reflection stay open)."""
    return (SERVICE_NAME, oip.SERVICE_NAME) if settings.oip.enabled else (SERVICE_NAME,)


def _serving(health: HealthServicer, service: str) -> Callable[[], Awaitable[bool]]:
    """Whether ``service`` is SERVING, as the health service answers it (ServerReady's answer)."""
    request = health_pb2.HealthCheckRequest(service=service)

    async def serving() -> bool:
        answer = await health.Check(request, None)  # ``service`` is always known: start() sets it
        return answer.status == health_pb2.HealthCheckResponse.SERVING

    return serving


def _interceptors(
    settings: Settings, metrics: ServerMetrics, services: tuple[str, ...]
) -> list[grpc.aio.ServerInterceptor]:
    # The first runs first: a caller without a token is refused before its message is parsed.
    # Every service's messages are parsed there, health's and reflection's too (gRPC would say UNKNOWN).
    parse = ParseRequests((*services, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME))
    tokens = [token.get_secret_value() for token in settings.auth.tokens]
    if not tokens:
        return [parse]
    from server.auth import BearerTokenInterceptor

    def count_refusal(method: str) -> None:  # refused before the servicer, which counts the rest
        metrics.requests.labels(method, "UNAUTHENTICATED").inc()

    return [BearerTokenInterceptor(tokens, services, count_refusal), parse]
