from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class AttentionKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_KIND_NONE: _ClassVar[AttentionKind]
    ATTENTION_KIND_CHANNEL: _ClassVar[AttentionKind]
    ATTENTION_KIND_SPATIAL: _ClassVar[AttentionKind]
    ATTENTION_KIND_BOTH: _ClassVar[AttentionKind]

class AttentionFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTENTION_FORMAT_FLOAT16: _ClassVar[AttentionFormat]
    ATTENTION_FORMAT_PNG: _ClassVar[AttentionFormat]
ATTENTION_KIND_NONE: AttentionKind
ATTENTION_KIND_CHANNEL: AttentionKind
ATTENTION_KIND_SPATIAL: AttentionKind
ATTENTION_KIND_BOTH: AttentionKind
ATTENTION_FORMAT_FLOAT16: AttentionFormat
ATTENTION_FORMAT_PNG: AttentionFormat

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data")
    class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
        __slots__ = ()
        DTYPE_UNSPECIFIED: _ClassVar[Tensor.DType]
        DTYPE_UINT8: _ClassVar[Tensor.DType]
        DTYPE_FLOAT32: _ClassVar[Tensor.DType]
    DTYPE_UNSPECIFIED: Tensor.DType
    DTYPE_UINT8: Tensor.DType
    DTYPE_FLOAT32: Tensor.DType
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    dtype: Tensor.DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    def __init__(self, dtype: _Optional[_Union[Tensor.DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ...) -> None: ...

class AttentionRequest(_message.Message):
    __slots__ = ("kind", "blocks", "format")
    KIND_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    kind: AttentionKind
    blocks: _containers.RepeatedScalarFieldContainer[str]
    format: AttentionFormat
    def __init__(self, kind: _Optional[_Union[AttentionKind, str]] = ..., blocks: _Optional[_Iterable[str]] = ..., format: _Optional[_Union[AttentionFormat, str]] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("request_id", "encoded", "tensor", "top_k", "attention")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ENCODED_FIELD_NUMBER: _ClassVar[int]
    TENSOR_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    encoded: bytes
    tensor: Tensor
    top_k: int
    attention: AttentionRequest
    def __init__(self, request_id: _Optional[str] = ..., encoded: _Optional[bytes] = ..., tensor: _Optional[_Union[Tensor, _Mapping]] = ..., top_k: _Optional[int] = ..., attention: _Optional[_Union[AttentionRequest, _Mapping]] = ...) -> None: ...

class Label(_message.Message):
    __slots__ = ("index", "name", "probability")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    probability: float
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., probability: _Optional[float] = ...) -> None: ...

class AttentionMap(_message.Message):
    __slots__ = ("block", "kind", "shape", "format", "data")
    BLOCK_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    block: str
    kind: AttentionKind
    shape: _containers.RepeatedScalarFieldContainer[int]
    format: AttentionFormat
    data: bytes
    def __init__(self, block: _Optional[str] = ..., kind: _Optional[_Union[AttentionKind, str]] = ..., shape: _Optional[_Iterable[int]] = ..., format: _Optional[_Union[AttentionFormat, str]] = ..., data: _Optional[bytes] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("preprocess_seconds", "queue_seconds", "inference_seconds", "postprocess_seconds", "batch_size")
    PREPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    preprocess_seconds: float
    queue_seconds: float
    inference_seconds: float
    postprocess_seconds: float
    batch_size: int
    def __init__(self, preprocess_seconds: _Optional[float] = ..., queue_seconds: _Optional[float] = ..., inference_seconds: _Optional[float] = ..., postprocess_seconds: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class ClassifyResponse(_message.Message):
    __slots__ = ("request_id", "labels", "attention", "model_version", "timings")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    MODEL_VERSION_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    labels: _containers.RepeatedCompositeFieldContainer[Label]
    attention: _containers.RepeatedCompositeFieldContainer[AttentionMap]
    model_version: str
    timings: Timings
    def __init__(self, request_id: _Optional[str] = ..., labels: _Optional[_Iterable[_Union[Label, _Mapping]]] = ..., attention: _Optional[_Iterable[_Union[AttentionMap, _Mapping]]] = ..., model_version: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...

class ItemError(_message.Message):
    __slots__ = ("code", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ...) -> None: ...

class ClassifyStreamResponse(_message.Message):
    __slots__ = ("request_id", "response", "error")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    response: ClassifyResponse
    error: ItemError
    def __init__(self, request_id: _Optional[str] = ..., response: _Optional[_Union[ClassifyResponse, _Mapping]] = ..., error: _Optional[_Union[ItemError, _Mapping]] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    def __init__(self, items: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[ClassifyStreamResponse]
    def __init__(self, results: _Optional[_Iterable[_Union[ClassifyStreamResponse, _Mapping]]] = ...) -> None: ...

class GetModelInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class BatchingInfo(_message.Message):
    __slots__ = ("max_batch_size", "max_batch_delay_ms", "max_queue")
    MAX_BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUE_FIELD_NUMBER: _ClassVar[int]
    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int
    def __init__(self, max_batch_size: _Optional[int] = ..., max_batch_delay_ms: _Optional[float] = ..., max_queue: _Optional[int] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("arch", "version", "labels", "input_height", "input_width", "mean", "std", "device", "dtype", "attention_blocks", "batching", "num_parameters", "max_image_pixels", "max_message_bytes", "max_batch_items", "backend", "workers", "worker")
    ARCH_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    INPUT_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    INPUT_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    BATCHING_FIELD_NUMBER: _ClassVar[int]
    NUM_PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_ITEMS_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    WORKER_FIELD_NUMBER: _ClassVar[int]
    arch: str
    version: str
    labels: _containers.RepeatedScalarFieldContainer[str]
    input_height: int
    input_width: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    std: _containers.RepeatedScalarFieldContainer[float]
    device: str
    dtype: str
    attention_blocks: _containers.RepeatedScalarFieldContainer[str]
    batching: BatchingInfo
    num_parameters: int
    max_image_pixels: int
    max_message_bytes: int
    max_batch_items: int
    backend: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    worker: int
    def __init__(self, arch: _Optional[str] = ..., version: _Optional[str] = ..., labels: _Optional[_Iterable[str]] = ..., input_height: _Optional[int] = ..., input_width: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., std: _Optional[_Iterable[float]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., attention_blocks: _Optional[_Iterable[str]] = ..., batching: _Optional[_Union[BatchingInfo, _Mapping]] = ..., num_parameters: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_batch_items: _Optional[int] = ..., backend: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., worker: _Optional[int] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("index", "pid", "ready", "restarts")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    READY_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    index: int
    pid: int
    ready: bool
    restarts: int
    def __init__(self, index: _Optional[int] = ..., pid: _Optional[int] = ..., ready: _Optional[bool] = ..., restarts: _Optional[int] = ...) -> None: ...
