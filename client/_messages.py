"""Plain arguments to protobuf requests, and protobuf replies to the plain types of `_types`."""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Literal

import numpy as np
from PIL import Image

from cbam.v1 import inference_pb2

from ._images import ImageInput, set_image
from ._types import BatchingInfo, LabelScore, ModelInfo, Prediction, Timings, WorkerInfo

__all__ = [
    "AttentionArg",
    "FormatArg",
    "build_request",
    "decode_attention_map",
    "to_model_info",
    "to_prediction",
]

AttentionArg = Literal["none", "channel", "spatial", "both"]
FormatArg = Literal["float16", "png"]

_KINDS = {
    "none": inference_pb2.ATTENTION_KIND_NONE,
    "channel": inference_pb2.ATTENTION_KIND_CHANNEL,
    "spatial": inference_pb2.ATTENTION_KIND_SPATIAL,
    "both": inference_pb2.ATTENTION_KIND_BOTH,
}
_KIND_NAMES = {
    inference_pb2.ATTENTION_KIND_CHANNEL: "channel",
    inference_pb2.ATTENTION_KIND_SPATIAL: "spatial",
}
_FORMATS = {"float16": inference_pb2.ATTENTION_FORMAT_FLOAT16, "png": inference_pb2.ATTENTION_FORMAT_PNG}


def build_request(
    image: ImageInput,
    *,
    request_id: str = "",
    top_k: int = 0,
    attention: AttentionArg | None = None,
    attention_blocks: Sequence[str] | None = None,
    attention_format: FormatArg = "float16",
) -> inference_pb2.ClassifyRequest:
    """One ClassifyRequest. top_k 0 lets the server choose; attention None or "none" asks for no maps."""
    if top_k < 0:
        raise ValueError(f"top_k should be >= 0, got {top_k}")
    if attention is not None and attention not in _KINDS:
        raise ValueError(f"attention should be one of {sorted(_KINDS)} or None, got {attention!r}")
    if attention_format not in _FORMATS:
        raise ValueError(f"attention_format should be one of {sorted(_FORMATS)}, got {attention_format!r}")
    request = inference_pb2.ClassifyRequest(request_id=request_id, top_k=top_k)
    set_image(request, image)
    if attention not in (None, "none"):
        request.attention.kind = _KINDS[attention]
        request.attention.blocks.extend(attention_blocks or ())
        request.attention.format = _FORMATS[attention_format]
    return request


def decode_attention_map(message: inference_pb2.AttentionMap) -> np.ndarray:
    """The map as a float32 array of `message.shape`, values in 0..1, from either encoding."""
    shape = tuple(message.shape)
    if message.format == inference_pb2.ATTENTION_FORMAT_FLOAT16:
        values = np.frombuffer(message.data, dtype="<f2")
    elif message.format == inference_pb2.ATTENTION_FORMAT_PNG:
        with Image.open(io.BytesIO(message.data)) as png:
            values = np.asarray(png.convert("L"), dtype=np.float32) / 255.0
    else:
        raise ValueError(f"unknown attention format {message.format} for block {message.block!r}")
    if values.size != int(np.prod(shape)):
        raise ValueError(
            f"attention map of block {message.block!r} has {values.size} values, its shape says {shape}"
        )
    return values.astype(np.float32).reshape(shape)


def to_prediction(response: inference_pb2.ClassifyResponse) -> Prediction:
    attention: dict[str, dict[str, np.ndarray]] = {}
    for item in response.attention:
        kind = _KIND_NAMES.get(item.kind)
        if kind is None:
            raise ValueError(
                f"attention map of block {item.block!r} has kind {item.kind}, not CHANNEL or SPATIAL"
            )
        attention.setdefault(item.block, {})[kind] = decode_attention_map(item)
    t = response.timings
    return Prediction(
        request_id=response.request_id,
        labels=[LabelScore(label.index, label.name, label.probability) for label in response.labels],
        attention=attention,
        model_version=response.model_version,
        timings=Timings(
            preprocess_seconds=t.preprocess_seconds,
            queue_seconds=t.queue_seconds,
            inference_seconds=t.inference_seconds,
            postprocess_seconds=t.postprocess_seconds,
            batch_size=t.batch_size,
        ),
    )


def to_model_info(message: inference_pb2.ModelInfo) -> ModelInfo:
    return ModelInfo(
        arch=message.arch,
        version=message.version,
        labels=list(message.labels),
        input_size=(message.input_height, message.input_width),
        mean=tuple(message.mean),
        std=tuple(message.std),
        device=message.device,
        dtype=message.dtype,
        attention_blocks=list(message.attention_blocks),
        batching=BatchingInfo(
            max_batch_size=message.batching.max_batch_size,
            max_batch_delay_ms=message.batching.max_batch_delay_ms,
            max_queue=message.batching.max_queue,
        ),
        num_parameters=message.num_parameters,
        max_image_pixels=message.max_image_pixels,
        max_message_bytes=message.max_message_bytes,
        max_batch_items=message.max_batch_items,
        workers=tuple(WorkerInfo(w.index, w.pid, w.ready, w.restarts) for w in message.workers),
        worker=message.worker,
    )
