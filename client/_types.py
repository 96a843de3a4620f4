"""Plain result types: what the client returns instead of protobuf messages."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from ._errors import CbamError

__all__ = ["BatchingInfo", "LabelScore", "ModelInfo", "Prediction", "StreamResult", "Timings"]

AttentionKindName = Literal["channel", "spatial"]


@dataclass(frozen=True)
class LabelScore:
    """One label of a prediction: class index, name and softmax probability."""

    index: int
    name: str
    probability: float


@dataclass(frozen=True)
class Timings:
    """Where the server spent its time on one request, in seconds, and the size of its batch."""

    preprocess_seconds: float = 0.0
    queue_seconds: float = 0.0
    inference_seconds: float = 0.0
    postprocess_seconds: float = 0.0
    batch_size: int = 0


@dataclass(frozen=True)
class Prediction:
    """The prediction for one image.

    `labels` are the top-k labels, most probable first. `attention` maps block name (network order) to
    {"channel": array of shape (C,), "spatial": array of shape (H, W)}, float32 values in 0..1, holding
    only the kinds that were asked for.
    """

    request_id: str
    labels: list[LabelScore]
    attention: dict[str, dict[AttentionKindName, np.ndarray]] = field(default_factory=dict)
    model_version: str = ""
    timings: Timings = field(default_factory=Timings)

    @property
    def top(self) -> LabelScore:
        """The most probable label."""
        return self.labels[0]


@dataclass(frozen=True)
class StreamResult:
    """One answer from a stream: the input's position, and either its prediction or its error.

    `latency_seconds` runs from the moment the request was handed to gRPC to the moment its answer came.
    """

    index: int
    prediction: Prediction | None
    error: CbamError | None
    latency_seconds: float

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class BatchingInfo:
    """The server's batching settings."""

    max_batch_size: int
    max_batch_delay_ms: float
    max_queue: int


@dataclass(frozen=True)
class WorkerInfo:
    """One server process behind the address (cbam-serve --workers)."""

    index: int
    pid: int
    ready: bool  # warmed up and taking calls
    restarts: int  # times restarted after it died


@dataclass(frozen=True)
class ModelInfo:
    """What the server is serving."""

    arch: str
    version: str
    labels: list[str]
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    device: str
    dtype: str
    attention_blocks: list[str]
    batching: BatchingInfo
    num_parameters: int
    max_image_pixels: int
    max_message_bytes: int
    max_batch_items: int = 0  # most images in one classify_batch call (0: a server from before it)
    workers: tuple[WorkerInfo, ...] = ()  # every worker process (empty: a server from before them)
    worker: int = 0  # the index of the worker that answered
