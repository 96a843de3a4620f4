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
        return await self._calls.unary("ServerLive", context, self._live, images=0, probe=True)

    async def ServerReady(self, request: pb.ServerReadyRequest, context: grpc.aio.ServicerContext):
        return await self._calls.unary("ServerReady", context, self._server_ready, images=0, probe=True)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: grpc.aio.ServicerContext):
        ready = self._model_ready
        return await self._calls.unary("ModelReady", context, lambda c: ready(request), images=0, probe=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest, context: grpc.aio.ServicerContext):
        return await self._calls.unary("ServerMetadata", context, self._server_metadata, images=0)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: grpc.aio.ServicerContext):
        describe = self._model_metadata
        return await self._calls.unary("ModelMetadata", context, lambda c: describe(request), images=0)

    async def ModelConfig(self, request: pb.ModelConfigRequest, context: grpc.aio.ServicerContext):
        configure = self._model_config
        return await self._calls.unary("ModelConfig", context, lambda c: configure(request), images=0)

    async def ModelStatistics(self, request: pb.ModelStatisticsRequest, context: grpc.aio.ServicerContext):
        stats = self._model_statistics
        return await self._calls.unary("ModelStatistics", context, lambda c: stats(request), images=0)

    async def RepositoryIndex(self, request: pb.RepositoryIndexRequest, context: grpc.aio.ServicerContext):
        index = self._repository_index
        return await self._calls.unary("RepositoryIndex", context, lambda c: index(request), images=0)

    async def ModelInfer(self, request: pb.ModelInferRequest, context: grpc.aio.ServicerContext):
        return await self._calls.unary(
            "ModelInfer", context, lambda call: self._infer(request, call), images=0
        )

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        limit = self._settings.limits.max_stream_inflight
        replies = self._calls.stream(
            "ModelStreamInfer", request_iterator, context, self._infer, _stream_reply, limit
        )
        async for reply in replies:
            yield reply

    async def RepositoryModelLoad(self, request, context):
        return await self._unimplemented("RepositoryModelLoad", context)

    async def RepositoryModelUnload(self, request, context):
        return await self._unimplemented("RepositoryModelUnload", context)

    async def SystemSharedMemoryStatus(self, request, context):
        return await self._unimplemented("SystemSharedMemoryStatus", context)

    async def SystemSharedMemoryRegister(self, request, context):
        return await self._unimplemented("SystemSharedMemoryRegister", context)

    async def SystemSharedMemoryUnregister(self, request, context):
        return await self._unimplemented("SystemSharedMemoryUnregister", context)

    async def CudaSharedMemoryStatus(self, request, context):
        return await self._unimplemented("CudaSharedMemoryStatus", context)

    async def CudaSharedMemoryRegister(self, request, context):
        return await self._unimplemented("CudaSharedMemoryRegister", context)

    async def CudaSharedMemoryUnregister(self, request, context):
        return await self._unimplemented("CudaSharedMemoryUnregister", context)

    async def TraceSetting(self, request, context):
        return await self._unimplemented("TraceSetting", context)

    async def LogSettings(self, request, context):
        return await self._unimplemented("LogSettings", context)

    async def _unimplemented(self, method: str, context: grpc.aio.ServicerContext):
        async def refuse(call: Call):
            raise Unsupported(f"{method} is not implemented: {_NOT_IMPLEMENTED[method]}")

        return await self._calls.unary(method, context, refuse, images=0)

    async def _live(self, call: Call) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, call: Call) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=await self._serving())

    async def _model_ready(self, request: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self._identity.check(request.name, request.version)
        return pb.ModelReadyResponse(ready=await self._ready())

    async def _server_metadata(self, call: Call) -> pb.ServerMetadataResponse:
        return self._server

    async def _model_metadata(self, request: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        self._identity.check(request.name, request.version)
        return self._described().metadata()

    async def _model_config(self, request: pb.ModelConfigRequest) -> pb.ModelConfigResponse:
        self._identity.check(request.name, request.version)
        return self._described().config()

    async def _model_statistics(self, request: pb.ModelStatisticsRequest) -> pb.ModelStatisticsResponse:
        if request.name or request.version:  # empty: every model (version)
            self._identity.check(request.name, request.version)
        stats = self._described().statistics(self._metrics.totals(INFERENCE_METHODS))
        return pb.ModelStatisticsResponse(model_stats=[stats])

    async def _repository_index(self, request: pb.RepositoryIndexRequest) -> pb.RepositoryIndexResponse:
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
