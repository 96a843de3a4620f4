"""preprocess: every accepted image form becomes the same normalised tensor; every bad one says why."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from server.errors import InvalidInput, TooLarge
from server.preprocess import ImageSpec, RawTensor, decode_image, load_pixels, tensor_from_raw
from tests.reference import preprocess

SPEC = ImageSpec(input_size=(24, 32), mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3), max_pixels=10_000)


def picture(width: int = 40, height: int = 30) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], axis=-1).astype(np.uint8)


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


# Every mode each format can carry (as Pillow writes them).
_MODES = {
    "PNG": ["RGB", "L", "P", "RGBA", "LA", "1", "I;16"],
    "JPEG": ["RGB", "L", "CMYK", "1"],
    "WEBP": ["RGB", "L", "P", "RGBA", "LA", "CMYK", "1"],
    "BMP": ["RGB", "L", "P", "RGBA", "1"],
    "GIF": ["RGB", "L", "P", "RGBA", "LA", "1"],
}


@pytest.mark.parametrize(("fmt", "mode"), [(fmt, mode) for fmt, modes in _MODES.items() for mode in modes])
def test_every_format_and_mode_becomes_rgb(fmt: str, mode: str) -> None:
    rgb = Image.fromarray(picture())
    image = (
        Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
        if mode == "I;16"
        else rgb.convert(mode)
    )
    data = encode(image, fmt)
    decoded = decode_image(data, SPEC.max_pixels)
    assert decoded.mode == "RGB" and decoded.size == (40, 30)
    x = preprocess(data, SPEC)
    assert x.shape == (3, 24, 32) and x.dtype == torch.float32 and torch.isfinite(x).all()


def test_lossless_png_equals_the_same_pixels_as_a_uint8_tensor() -> None:
    pixels = picture()
    from_png = preprocess(encode(Image.fromarray(pixels), "PNG"), SPEC)
    from_tensor = preprocess(RawTensor("uint8", pixels.shape, pixels.tobytes()), SPEC)
    assert torch.equal(from_png, from_tensor)


def test_normalisation_uses_mean_and_std() -> None:
    spec = ImageSpec((2, 2), (0.5, 0.5, 0.5), (0.5, 0.25, 0.125), 100)
    white = np.full((2, 2, 3), 255, np.uint8)
    x = preprocess(RawTensor("uint8", (2, 2, 3), white.tobytes()), spec)
    assert torch.allclose(x[:, 0, 0], torch.tensor([1.0, 2.0, 4.0]))


def test_exif_orientation_is_honoured() -> None:
    image = Image.fromarray(picture(40, 30))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    decoded = decode_image(encode(image, "JPEG", exif=exif.tobytes()), SPEC.max_pixels)
    assert decoded.size == (30, 40)


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    wide = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1024).astype(np.uint16)
    decoded = np.asarray(decode_image(encode(Image.fromarray(wide), "PNG"), 100))
    assert decoded.shape == (8, 8, 3)
    assert (
        decoded[..., 0].max() > 250 and len(np.unique(decoded[..., 0])) == 64
    )  # 0..65535 spread over 0..255


def test_gif_first_frame() -> None:
    frames = [Image.new("RGB", (8, 8), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:])
    decoded = np.asarray(decode_image(buffer.getvalue(), 100))
    assert tuple(decoded[0, 0]) == (255, 0, 0)


def test_float32_tensor_is_resized_and_normalised() -> None:
    x = np.full((3, 48, 64), 0.5, dtype="<f4")
    out = preprocess(RawTensor("float32", x.shape, x.tobytes()), SPEC)
    assert out.shape == (3, 24, 32)
    expected = (0.5 - torch.tensor(SPEC.mean)) / torch.tensor(SPEC.std)
    assert torch.allclose(out[:, 5, 5], expected, atol=1e-6)


def test_grey_and_rgba_uint8_tensors() -> None:
    grey = tensor_from_raw(RawTensor("uint8", (4, 5, 1), bytes(range(20))), 100)
    rgba = tensor_from_raw(RawTensor("uint8", (4, 5, 4), bytes(80)), 100)
    assert grey.mode == "RGB" and grey.size == (5, 4) and rgba.mode == "RGB"


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png_bomb(width: int, height: int) -> bytes:
    """A PNG that claims width x height pixels, with one compressed row of data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(1 + 3 * min(width, 1000)))
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "image.encoded is empty"),
        (b"definitely not an image", "image.encoded"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "image.encoded"),
    ],
)
def test_undecodable_bytes_are_invalid(data: bytes, message: str) -> None:
    with pytest.raises(InvalidInput, match=message) as info:
        preprocess(data, SPEC)
    assert not isinstance(info.value, TooLarge)


def test_truncated_image_is_invalid() -> None:
    data = encode(Image.fromarray(picture()), "PNG")
    with pytest.raises(InvalidInput, match="corrupt"):
        preprocess(data[: len(data) // 2], SPEC)


def test_tiff_is_not_accepted() -> None:
    with pytest.raises(InvalidInput, match="JPEG, PNG, WEBP, BMP, GIF"):
        preprocess(encode(Image.fromarray(picture()), "TIFF"), SPEC)


def test_over_the_pixel_limit_is_too_large() -> None:
    with pytest.raises(TooLarge, match="over the limit of 10000"):
        preprocess(encode(Image.new("L", (101, 100)), "PNG"), SPEC)


@pytest.mark.parametrize("size", [(100_000, 100_000), (20_000, 6_000), (65_535, 65_535)])
def test_a_bomb_header_is_refused_before_decoding(size: tuple[int, int]) -> None:
    # Only a header: decoding would need gigabytes. Far over Pillow's own limit too, without a warning.
    with pytest.raises(TooLarge):
        decode_image(_png_bomb(*size), 10_000)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (RawTensor("int16", (2, 2, 3), bytes(24)), "image.tensor.dtype"),
        (RawTensor("uint8", (2, 2), bytes(4)), "image.tensor.shape"),
        (RawTensor("uint8", (2, 2, 2), bytes(8)), "channels"),
        (RawTensor("uint8", (0, 2, 3), b""), "image.tensor.shape"),
        (RawTensor("uint8", (2, 2, 3), bytes(11)), "image.tensor.data: 11 bytes"),
        (RawTensor("float32", (3, 2, 2), bytes(47)), "needs 48"),
        (RawTensor("float32", (2, 2, 3), bytes(48)), "channels"),
        (RawTensor("uint8", (2**31, 2**31, 3), b""), "over the limit"),
    ],
)
def test_bad_tensors_are_invalid(raw: RawTensor, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        preprocess(raw, SPEC)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_invalid(bad: float) -> None:
    x = np.zeros((3, 4, 4), dtype="<f4")
    x[1, 2, 3] = bad
    with pytest.raises(InvalidInput, match="NaN or Inf"):
        preprocess(RawTensor("float32", x.shape, x.tobytes()), SPEC)


@pytest.mark.parametrize("bad", [-0.01, 1.01, 3e38])
def test_float_values_outside_0_1_are_invalid(bad: float) -> None:
    x = np.full((3, 4, 4), 0.5, dtype="<f4")
    x[2, 1, 1] = bad
    with pytest.raises(InvalidInput, match="must lie in 0..1"):
        preprocess(RawTensor("float32", x.shape, x.tobytes()), SPEC)


def test_a_uint8_tensor_at_the_input_size_skips_decoding_but_not_the_checks() -> None:
    """The served fast path: pixels already at the input size come back as they are, as a writable copy,
    equal to what the general path makes of them; a short one is still refused, naming the field."""
    pixels = picture(32, 24)
    raw = RawTensor("uint8", (24, 32, 3), pixels.tobytes())
    fast = load_pixels(raw, SPEC)
    assert fast.dtype == torch.uint8 and fast.shape == (24, 32, 3)
    assert torch.equal(fast, torch.from_numpy(pixels))
    fast[0, 0, 0] = 7  # writable, and not the request's bytes
    assert raw.data == pixels.tobytes()
    padded = RawTensor("uint8", (24, 32, 4), np.dstack([pixels, np.full((24, 32), 255, np.uint8)]).tobytes())
    assert torch.equal(load_pixels(padded, SPEC), torch.from_numpy(pixels))  # the general path agrees
    with pytest.raises(InvalidInput, match="image.tensor.data: 2303 bytes"):
        load_pixels(RawTensor("uint8", (24, 32, 3), bytes(2303)), SPEC)
    with pytest.raises(TooLarge, match="over the limit"):
        load_pixels(raw, ImageSpec(SPEC.input_size, SPEC.mean, SPEC.std, max_pixels=100))
