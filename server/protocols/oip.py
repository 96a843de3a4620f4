"""The Open Inference Protocol servicer (inference.GRPCInferenceService, KServe v2 with Triton's
extensions): its messages to the pipeline's plain types and back. What every call shares (drain, status
of a failure, metrics, logging) is server/calls.py's; the tensors are oip_tensors', the model's
description oip_model's.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable
from importlib import metadata

import grpc

from cbam.oip import grpc_service_pb2 as pb
from cbam.oip import grpc_service_pb2_grpc
from server.calls import Call, CallTracker, Failure, new_request_id
from server.config import Settings
from server.errors import InvalidInput, NotReady, Unsupported
from server.metrics import ServerMetrics
from server.pipeline import InferencePipeline
from server.protocols.oip_model import INFERENCE_METHODS, ModelIdentity, OipModel
from server.protocols.oip_tensors import parse_options, parse_outputs, to_response, to_tensor_query

__all__ = ["SERVICE_NAME", "OipServicer", "model_identity"]

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
MAX_ID_CHARS = 128
_EXTENSIONS = ["classification", "model_configuration", "statistics", "parameters"]
_ONE_MODEL = "cbam-serve serves the one model it loaded at start"
_NO_SHARED_MEMORY = "tensors travel in the messages; there is no shared memory to manage"
_NOT_IMPLEMENTED = {  # RPC -> why not
    "RepositoryModelLoad": _ONE_MODEL,
    "RepositoryModelUnload": _ONE_MODEL,
    "SystemSharedMemoryStatus": _NO_SHARED_MEMORY,
    "SystemSharedMemoryRegister": _NO_SHARED_MEMORY,
    "SystemSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryStatus": _NO_SHARED_MEMORY,
    "CudaSharedMemoryRegister": _NO_SHARED_MEMORY,
    "CudaSharedMemoryUnregister": _NO_SHARED_MEMORY,
    "TraceSetting": "there are no traces; the request log and /metrics say where time goes",
    "LogSettings": "the log level is set at start (cbam-serve --log.level)",
}


def model_identity(settings: Settings, arch: str, version: str) -> ModelIdentity:
    """The served model's name (settings.oip.model_name, or the architecture's) and version."""
    return ModelIdentity(settings.oip.model_name or arch, version)


def _server_version() -> str:
    try:
        return metadata.version("cbam-serve")
    except metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _refusing(method: str):
    """The servicer method of an RPC this server does not implement: UNIMPLEMENTED, saying why."""

    async def refuse(self: OipServicer, request, context: grpc.aio.ServicerContext):
        async def handle(request, call: Call):
            raise Unsupported(f"{method} is not implemented: {_NOT_IMPLEMENTED[method]}")

        return await self._answer(method, request, context, handle)

    refuse.__name__ = refuse.__qualname__ = method
    return refuse


class OipServicer(grpc_service_pb2_grpc.GRPCInferenceServiceServicer):
    """inference.GRPCInferenceService over an InferencePipeline; ``calls`` does what every RPC shares.

    ``serving()`` says whether the server takes requests (the health service's answer: false while it
    warms up and from the first moment of a drain)."""

    def __init__(
        self,
        pipeline: InferencePipeline,
        calls: CallTracker,
        metrics: ServerMetrics,
        settings: Settings,
        serving: Callable[[], Awaitable[bool]],
    ) -> None:
        self._pipeline = pipeline
        self._calls = calls
        self._metrics = metrics
        self._settings = settings
        self._serving = serving
        d = pipeline.description
        self._identity = model_identity(settings, d.arch, d.version)
        self._model: OipModel | None = None
        self._server = pb.ServerMetadataResponse(
            name="cbam-serve", version=_server_version(), extensions=_EXTENSIONS
        )

    async def ServerLive(self, request: pb.ServerLiveRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ServerLive", request, context, self._live, probe=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ServerReady", request, context, self._server_ready, probe=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ModelReady", request, context, self._model_ready, probe=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ServerMetadata", request, context, self._server_metadata)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ModelMetadata", request, context, self._model_metadata)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ModelConfig", request, context, self._model_config)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ModelStatistics", request, context, self._model_statistics)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext):
        return await self._answer("RepositoryIndex", request, context, self._repository_index)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        return await self._answer("ModelInfer", request, context, self._infer)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        limit = self._settings.limits.max_stream_inflight
        replies = self._calls.stream(
            "ModelStreamInfer", request_iterator, context, self._infer, _stream_reply, limit
        )
        async for reply in replies:
            yield reply

    # Triton's other extensions: each answers UNIMPLEMENTED, saying why (_NOT_IMPLEMENTED).
    RepositoryModelLoad = _refusing("RepositoryModelLoad")
    RepositoryModelUnload = _refusing("RepositoryModelUnload")
    SystemSharedMemoryStatus = _refusing("SystemSharedMemoryStatus")
    SystemSharedMemoryRegister = _refusing("SystemSharedMemoryRegister")
    SystemSharedMemoryUnregister = _refusing("SystemSharedMemoryUnregister")
    CudaSharedMemoryStatus = _refusing("CudaSharedMemoryStatus")
    CudaSharedMemoryRegister = _refusing("CudaSharedMemoryRegister")
    CudaSharedMemoryUnregister = _refusing("CudaSharedMemoryUnregister")
    TraceSetting = _refusing("TraceSetting")
    LogSettings = _refusing("LogSettings")

    def _answer(self, method: str, request, context: grpc.aio.ServicerContext, handle, probe: bool = False):
        """``handle(request, call)`` as one unary call of ``method``; its images, if any, it counts itself."""
        return self._calls.unary(method, context, lambda call: handle(request, call), images=0, probe=probe)

    async def _live(self, request: pb.ServerLiveRequest, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, request: pb.ServerReadyRequest, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._serving())

    async def _model_ready(self, request: pb.ModelReadyRequest, call: Call) -> pb.ModelReadyResponse:
        self._identity.check(request.name, request.version)
        return pb.ModelReadyResponse(ready=await self._ready())

    async def _server_metadata(
        self, request: pb.ServerMetadataRequest, call: Call
    ) -> pb.ServerMetadataResponse:
        return self._server

    async def _model_metadata(self, request: pb.ModelMetadataRequest, call: Call) -> pb.ModelMetadataResponse:
        self._identity.check(request.name, request.version)
        return self._described().metadata()

    async def _model_config(self, request: pb.ModelConfigRequest, call: Call) -> pb.ModelConfigResponse:
        self._identity.check(request.name, request.version)
        return self._described().config()

    async def _model_statistics(
        self, request: pb.ModelStatisticsRequest, call: Call
    ) -> pb.ModelStatisticsResponse:
        if request.name or request.version:  # empty: every model (version)
            self._identity.check(request.name, request.version)
        stats = self._described().statistics(self._metrics.totals(INFERENCE_METHODS))
        return pb.ModelStatisticsResponse(model_stats=[stats])

    async def _repository_index(
        self, request: pb.RepositoryIndexRequest, call: Call
    ) -> pb.RepositoryIndexResponse:
        ready = await self._ready()
        response = pb.RepositoryIndexResponse()
        if ready or not request.ready:
            entry = response.models.add(name=self._identity.name, version=self._identity.version)
            entry.state, entry.reason = ("READY", "") if ready else ("UNAVAILABLE", "warming up or draining")
        return response

    async def _infer(self, request: pb.ModelInferRequest, call: Call) -> pb.ModelInferResponse:
        if len(request.id) > MAX_ID_CHARS:
            raise InvalidInput(f"id: {len(request.id)} characters, at most {MAX_ID_CHARS}")
        call.request_id = request.id or new_request_id()
        self._identity.check(request.model_name, request.model_version)
        model = self._described()
        options = parse_options(request.parameters)
        outputs = parse_outputs(request.outputs, model)
        limit = self._settings.limits.max_batch_items
        query = to_tensor_query(request, model, outputs, call.request_id, limit)
        call.images = len(query.images)
        deadline = call.deadline
        if options.timeout_s is not None:
            own = time.monotonic() + options.timeout_s
            deadline = own if deadline is None else min(deadline, own)
        try:
            prediction = await self._pipeline.classify_tensor(query, deadline)
        except InvalidInput as exc:  # a bad encoded image: say which tensor it was in
            raise type(exc)(f"input {request.inputs[0].name!r} {exc}") from None
        return to_response(request, model, outputs, options, prediction)

    async def _ready(self) -> bool:
        return self._pipeline.attention_shapes is not None and await self._serving()

    def _described(self) -> OipModel:
        if self._model is None:
            shapes = self._pipeline.attention_shapes
            if shapes is None:
                raise NotReady(
                    f"model {self._identity.name!r} is warming up; ModelReady says when it is ready"
                )
            self._model = OipModel.describe(
                self._identity, self._pipeline.description, shapes, self._settings
            )
        return self._model


def _stream_reply(
    request: pb.ModelInferRequest, outcome: pb.ModelInferResponse | Failure
) -> pb.ModelStreamInferResponse:
    if isinstance(outcome, Failure):
        # The stream carries no status per answer: the code leads the message.
        failed = pb.ModelInferResponse(
            model_name=request.model_name, model_version=request.model_version, id=request.id
        )
        return pb.ModelStreamInferResponse(
            error_message=f"{outcome.code.name}: {outcome.message}", infer_response=failed
        )
    return pb.ModelStreamInferResponse(infer_response=outcome)
