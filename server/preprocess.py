"""Turn what a caller sent (image file bytes or a raw tensor) into the model's input tensor.

Pure functions, run in a thread before a request is queued, so a bad input fails only its own
request. Every check says which field was wrong, what it got and what is allowed.

``load_pixels`` is the served path: decode (JPEG at a reduced size when the image is larger than the
model's input, Pillow's draft mode), validate, resize once, and hand over uint8 pixels; the runner
normalises them in the batch. (The plain float32 reference it is tested against is tests/reference.py.)
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import (
    BmpImagePlugin,
    GifImagePlugin,
    Image,
    ImageFile,
    ImageOps,
    JpegImagePlugin,
    PngImagePlugin,
    WebPImagePlugin,
)

from server.errors import InvalidInput, TooLarge

__all__ = [
    "ALLOWED_FORMATS",
    "ImageSpec",
    "RawTensor",
    "decode_image",
    "is_ready_pixels",
    "load_pixels",
    "tensor_from_raw",
]

ALLOWED_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "GIF")
# Importing a plugin registers it in Image.OPEN, which _open() reads.
_PLUGINS = (BmpImagePlugin, GifImagePlugin, JpegImagePlugin, PngImagePlugin, WebPImagePlugin)
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


@dataclass(frozen=True)
class RawTensor:
    """A decoded image as sent on the wire: ``dtype`` is "uint8" (H x W x C) or "float32" (C x H x W)."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


@dataclass(frozen=True)
class ImageSpec:
    """What the model expects and how big an image may be."""

    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    max_pixels: int


def _normalise(x: torch.Tensor, spec: ImageSpec) -> torch.Tensor:
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean) / std).contiguous()


def is_ready_pixels(source: bytes | RawTensor, spec: ImageSpec) -> bool:
    """A uint8 H x W x 3 tensor at the model's input size: nothing to decode or resize, only to check
    and copy (cheaper on the event loop than a trip to a preprocessing thread)."""
    return (
        isinstance(source, RawTensor)
        and source.dtype == "uint8"
        and tuple(source.shape) == (*spec.input_size, 3)
    )


def load_pixels(source: bytes | RawTensor, spec: ImageSpec) -> torch.Tensor:
    """Decode, validate and resize one image: uint8 H x W x 3 pixels at the model's input size, for the
    runner to normalise in the batch. A float32 tensor comes back resized and normalised (3 x H x W)."""
    height, width = spec.input_size
    if is_ready_pixels(source, spec):
        # Check the length and copy once (no PIL round trip, which made three copies of the pixels:
        # a tenth of the event loop's time per small request).
        if len(source.data) != height * width * 3 or height * width > spec.max_pixels:
            tensor_from_raw(source, spec.max_pixels)  # raises, naming what is wrong
        pixels = np.frombuffer(source.data, dtype=np.uint8).reshape(height, width, 3)
        return torch.from_numpy(pixels.copy())  # a copy: frombuffer's array is read-only
    if isinstance(source, RawTensor):
        pixels = tensor_from_raw(source, spec.max_pixels)
        if isinstance(pixels, torch.Tensor):
            return _normalise(_resize_tensor(pixels, spec.input_size), spec)
    else:
        pixels = decode_image(source, spec.max_pixels, draft_size=(width, height))
    if pixels.size != (width, height):
        pixels = pixels.resize((width, height), Image.Resampling.BILINEAR)
    return torch.from_numpy(np.array(pixels, dtype=np.uint8))  # np.array: a writable copy


def decode_image(data: bytes, max_pixels: int, draft_size: tuple[int, int] | None = None) -> Image.Image:
    """Decode an image file into an RGB PIL image, honouring EXIF orientation.

    The size is read from the header and checked against ``max_pixels`` before any pixel is
    decoded, so a decompression bomb costs nothing but its header. With ``draft_size`` (W, H), a JPEG
    larger than it is decoded at 1/2, 1/4 or 1/8 scale (never below that size, either way round).
    """
    if not data:
        raise InvalidInput("image.encoded is empty")
    try:
        image = _open(data)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image.encoded: {exc}") from None
    except Exception as exc:  # whatever a decoder raises on hostile bytes, the bytes are the problem
        raise InvalidInput(f"image.encoded: corrupt image ({len(data)} bytes): {exc}") from None
    if image is None:
        raise InvalidInput(
            f"image.encoded: not a {', '.join(ALLOWED_FORMATS)} image "
            f"({len(data)} bytes, starting {data[:8]!r})"
        )
    width, height = image.size
    _check_pixels("image.encoded", width, height, max_pixels)
    try:
        image.seek(0)  # GIF, WebP: the first frame
        if draft_size is not None and image.format == "JPEG":
            # The longer side on both axes, so an EXIF rotation still leaves both at least the target.
            side = max(draft_size)
            image.draft(None, (side, side))
        image.load()
        ImageOps.exif_transpose(image, in_place=True)  # in place: no copy when there is nothing to turn
        return _to_rgb(image)
    except Image.DecompressionBombError as exc:
        raise TooLarge(f"image.encoded: {exc}") from None
    except Exception as exc:  # as above: a decoder's failure on these bytes is their fault
        raise InvalidInput(f"image.encoded: corrupt {image.format} image: {exc}") from None


def tensor_from_raw(raw: RawTensor, max_pixels: int) -> Image.Image | torch.Tensor:
    """Validate a raw tensor. uint8 H x W x C becomes an RGB image; float32 3 x H x W a tensor in 0..1."""
    if raw.dtype == "uint8":
        itemsize, layout = 1, "H x W x C"
    elif raw.dtype == "float32":
        itemsize, layout = 4, "C x H x W"
    else:
        raise InvalidInput(f"image.tensor.dtype: {raw.dtype!r} is not supported; use uint8 or float32")
    if len(raw.shape) != 3 or any(d <= 0 for d in raw.shape):
        raise InvalidInput(
            f"image.tensor.shape: {list(raw.shape)} is not a {raw.dtype} shape {layout} of positive sizes"
        )
    expected = int(np.prod(raw.shape, dtype=np.int64)) * itemsize
    if raw.dtype == "uint8":
        height, width, channels = raw.shape
        allowed_channels = (1, 3, 4)
    else:
        channels, height, width = raw.shape
        allowed_channels = (3,)
    if channels not in allowed_channels:
        raise InvalidInput(
            f"image.tensor.shape: {channels} channels in {list(raw.shape)} ({layout}); "
            f"{raw.dtype} takes {' or '.join(map(str, allowed_channels))}"
        )
    _check_pixels("image.tensor", width, height, max_pixels)
    if len(raw.data) != expected:
        raise InvalidInput(
            f"image.tensor.data: {len(raw.data)} bytes, but shape {list(raw.shape)} of {raw.dtype} "
            f"needs {expected}"
        )
    if raw.dtype == "uint8":
        array = np.frombuffer(raw.data, dtype=np.uint8).reshape(height, width, channels)
        if channels == 1:
            return Image.fromarray(np.ascontiguousarray(array[:, :, 0])).convert("RGB")
        return Image.fromarray(np.ascontiguousarray(array[:, :, :3]))
    array = np.frombuffer(raw.data, dtype="<f4").reshape(channels, height, width)
    if not np.isfinite(array).all():
        raise InvalidInput("image.tensor.data: float32 tensor holds NaN or Inf")
    low, high = float(array.min()), float(array.max())
    if low < 0.0 or high > 1.0:
        raise InvalidInput(f"image.tensor.data: float32 values must lie in 0..1, got {low:g}..{high:g}")
    return torch.from_numpy(array.astype(np.float32))  # a copy: frombuffer's array is read-only


def _open(data: bytes) -> ImageFile.ImageFile | None:
    # Image.open() would also apply Pillow's process-wide bomb limit, which warns (or fails) at its own
    # fixed size before ours can answer; the format plugins read only the header, and we check that.
    prefix = data[:16]
    for fmt in ALLOWED_FORMATS:
        factory, accept = Image.OPEN[fmt]
        if accept is None or accept(prefix):
            try:
                return factory(io.BytesIO(data), "")
            except (SyntaxError, IndexError, TypeError, struct.error):
                continue  # not this format after all (as Image.open does)
    return None


def _check_pixels(field: str, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise TooLarge(f"{field}: {width}x{height} = {width * height} pixels, over the limit of {max_pixels}")


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in _SIXTEEN_BIT_MODES:
        # Pillow's convert() clips 16-bit values at 255 instead of scaling them.
        wide = np.asarray(image).astype(np.float64)
        image = Image.fromarray(np.clip(wide / 257.0 + 0.5, 0, 255).astype(np.uint8))
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")  # the direct P -> RGB conversion warns about byte transparency
    return image if image.mode == "RGB" else image.convert("RGB")


def _resize_tensor(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(x.shape[1:]) == tuple(size):
        return x
    # Antialiased bilinear, like Pillow's BILINEAR that encoded images get.
    return F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", antialias=True, align_corners=False)[0]
