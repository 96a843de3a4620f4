"""Turning what a caller holds (a path, bytes, a PIL image, a NumPy array) into the request's image field."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
from PIL import Image

from cbam.v1 import inference_pb2

__all__ = ["ImageInput", "open_image", "set_image"]

ImageInput = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray

# Modes sent as they are; anything else (palette, CMYK, 16-bit, ...) is converted to RGB first.
_CHANNELS_BY_MODE = {"L": 1, "RGB": 3, "RGBA": 4}


def set_image(request: inference_pb2.ClassifyRequest, image: ImageInput) -> None:
    """Fill `request.encoded` or `request.tensor` from `image`.

    Paths and bytes are sent as the encoded file (the server decodes it). PIL images and uint8 arrays
    (H x W or H x W x C, C in 1, 3, 4) go as a uint8 tensor; float arrays must be 3 x H x W with values
    in 0..1 and go as a float32 tensor.
    """
    if isinstance(image, (str, os.PathLike)):
        request.encoded = Path(image).read_bytes()
    elif isinstance(image, (bytes, bytearray, memoryview)):
        request.encoded = bytes(image)
    elif isinstance(image, Image.Image):
        request.tensor.CopyFrom(_pil_tensor(image))
    elif isinstance(image, np.ndarray):
        request.tensor.CopyFrom(_array_tensor(image))
    else:
        raise _not_an_image(image)


def open_image(image: ImageInput) -> Image.Image:
    """`image` as an RGB PIL image to draw on: what set_image would send, decoded here."""
    if isinstance(image, (str, os.PathLike, bytes, bytearray, memoryview)):
        source = io.BytesIO(bytes(image)) if isinstance(image, (bytes, bytearray, memoryview)) else image
        with Image.open(source) as opened:
            return opened.convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        array = _checked_array(image)
        if array.dtype != np.uint8:  # 3 x H x W in 0..1
            array = np.round(np.clip(array, 0, 1) * 255).astype(np.uint8).transpose(1, 2, 0)
        return Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array).convert("RGB")
    raise _not_an_image(image)


def _not_an_image(image: object) -> TypeError:
    kind = type(image).__name__
    return TypeError(f"image should be a path, bytes, a PIL image or a NumPy array, got {kind}")


def _pil_tensor(image: Image.Image) -> inference_pb2.Tensor:
    if image.mode not in _CHANNELS_BY_MODE:
        image = image.convert("RGB")
    return _array_tensor(np.asarray(image))


def _checked_array(array: np.ndarray) -> np.ndarray:
    """A uint8 H x W x C (C in 1, 3, 4) or float 3 x H x W array; raises ValueError naming what it got."""
    if array.dtype == np.uint8:
        if array.ndim == 2:
            array = array[:, :, None]
        if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
            raise ValueError(
                f"a uint8 image should be H x W or H x W x C with C in 1, 3, 4, got {array.shape}"
            )
    elif np.issubdtype(array.dtype, np.floating):
        if array.ndim != 3 or array.shape[0] != 3:
            raise ValueError(f"a float image should be 3 x H x W with values in 0..1, got {array.shape}")
    else:
        raise ValueError(f"an image array should be uint8 or floating point, got {array.dtype}")
    return array


def _array_tensor(array: np.ndarray) -> inference_pb2.Tensor:
    array = _checked_array(array)
    if array.dtype == np.uint8:
        dtype = inference_pb2.Tensor.DTYPE_UINT8
    else:
        array = array.astype("<f4", copy=False)
        dtype = inference_pb2.Tensor.DTYPE_FLOAT32
    data = np.ascontiguousarray(array).tobytes()
    return inference_pb2.Tensor(dtype=dtype, shape=list(array.shape), data=data)
