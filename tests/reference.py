"""Reference implementations the served fast paths are checked against (tests and scripts/profile_request.py).

``preprocess`` is the preprocessing the default model was trained with, done the plain way: decode the
whole image, resize it once with Pillow's bilinear filter, scale to 0..1 and normalise in float32.
The server instead hands uint8 pixels (JPEGs decoded in draft mode) to the runner, which normalises
them in the batch. ``top_k`` is one row's softmax and top-k, where the server does a whole batch's.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from server.postprocess import LabelScore, top_k_rows
from server.preprocess import ImageSpec, RawTensor, decode_image, load_pixels, tensor_from_raw

__all__ = ["preprocess", "top_k"]


def preprocess(source: bytes | RawTensor, spec: ImageSpec) -> torch.Tensor:
    """Decode, validate, resize and normalise one image into a float32 3 x H x W tensor."""
    if isinstance(source, RawTensor):
        pixels = tensor_from_raw(source, spec.max_pixels)
        if isinstance(pixels, torch.Tensor):  # float32 in 0..1: the server resizes and normalises it
            return load_pixels(source, spec)
    else:
        pixels = decode_image(source, spec.max_pixels)
    height, width = spec.input_size
    if pixels.size != (width, height):
        pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    array = (np.asarray(pixels, dtype=np.float32) / 255.0 - mean) / std  # H x W x 3
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))


def top_k(logits: torch.Tensor, labels: Sequence[str], k: int) -> list[LabelScore]:
    """Softmax over one row of logits and the ``k`` most probable labels, most probable first."""
    return top_k_rows(logits[None], labels, [k])[0]
