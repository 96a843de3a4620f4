"""Property-based tests of the image decoder and the raw-tensor validator (server/preprocess.py).

Whatever bytes come in, the decoder either returns an RGB image within the pixel limit or raises
InvalidInput (TooLarge is one); nothing else escapes, no warning either (pytest turns warnings into
errors). A valid image of any mode, size and format decodes to its own size.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from server.config import Limits, load_settings
from server.errors import InvalidInput, TooLarge
from server.preprocess import ImageSpec, RawTensor, decode_image, tensor_from_raw
from tests.reference import preprocess
from tests.reliability import corpus

LIMIT = 4096  # pixels: small, so that the strategies below cross it often
SPEC = ImageSpec(input_size=(16, 16), mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), max_pixels=LIMIT)



# Twice PIL.Image.MAX_IMAGE_PIXELS: Pillow's WebP plugin refuses more as it opens a file.
PILLOW_HARD_LIMIT = 178_956_970

FAST = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)

_MODES_AND_FORMATS = [
    ("RGB", "PNG"), ("RGB", "JPEG"), ("RGB", "WEBP"), ("RGB", "BMP"), ("RGB", "GIF"),
    ("L", "PNG"), ("L", "JPEG"), ("1", "PNG"), ("1", "BMP"), ("P", "PNG"), ("P", "GIF"),
    ("RGBA", "PNG"), ("RGBA", "WEBP"), ("LA", "PNG"), ("CMYK", "JPEG"), ("I;16", "PNG"),
]


@st.composite
def valid_images(draw) -> tuple[bytes, tuple[int, int]]:
    mode, fmt = draw(st.sampled_from(_MODES_AND_FORMATS))
    width = draw(st.integers(1, 96))
    height = draw(st.integers(1, max(1, min(96, LIMIT // width))))
    seed = draw(st.integers(0, 2**16))
    rgb = Image.fromarray(corpus.picture(width, height, seed))
    if mode == "I;16":
        image = Image.fromarray(np.asarray(rgb.convert("L")).astype(np.uint16) * 257)
    else:
        image = rgb.convert(mode)
    return corpus.encode(image, fmt), (width, height)


def _check_decoded(image: Image.Image) -> None:
    assert image.mode == "RGB"
    assert 1 <= image.size[0] * image.size[1] <= LIMIT


@given(data=st.binary(max_size=2048))
@example(data=b"")
@example(data=b"\x89PNG\r\n\x1a\n")
@example(data=b"\xff\xd8\xff")
@example(data=b"GIF89a")
@example(data=b"RIFF\x00\x00\x00\x00WEBPVP8 ")
@example(data=b"BM")
@FAST
def test_arbitrary_bytes_decode_or_raise_invalid_input(data):
    try:
        image = decode_image(data, LIMIT)
    except InvalidInput as exc:
        assert str(exc).startswith("image.encoded"), str(exc)  # the message names the field
    else:
        _check_decoded(image)


@given(valid_images())
@FAST
def test_every_mode_and_format_decodes_to_its_own_size(case):
    data, size = case
    image = decode_image(data, LIMIT)
    _check_decoded(image)
    assert image.size == size


@given(valid_images(), st.data())
@FAST
def test_damaged_images_decode_or_raise_invalid_input(case, data):
    encoded, _ = case
    damaged = bytearray(encoded)
    how = data.draw(st.sampled_from(["truncate", "flip", "splice"]))
    if how == "truncate":
        damaged = damaged[: data.draw(st.integers(0, len(damaged) - 1))]
    elif how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(damaged) - 1))
            damaged[i] ^= 1 << data.draw(st.integers(0, 7))
    else:
        at = data.draw(st.integers(0, len(damaged)))
        damaged[at:at] = data.draw(st.binary(min_size=1, max_size=64))
    try:
        image = decode_image(bytes(damaged), LIMIT)
    except InvalidInput:
        pass
    else:
        _check_decoded(image)


@given(width=st.integers(1, 2**31 - 1), height=st.integers(1, 2**31 - 1))
@FAST
def test_a_header_over_the_limit_is_too_large_before_any_pixel_is_decoded(width, height):
    data = corpus.raw_png(width, height, 8, 0, [b"\x00"])  # one byte of pixel data for any size
    try:
        decode_image(data, LIMIT)
    except TooLarge:
        assert width * height > LIMIT
    except InvalidInput:
        assert width * height <= LIMIT  # fits, but the pixel data is missing


@pytest.mark.parametrize("limit", [LIMIT, 100_000_000, PILLOW_HARD_LIMIT])
def test_the_configured_limit_decides_not_pillows_own(limit):
    """Pillow warns above 89 M pixels and refuses above 179 M; only max_image_pixels should count."""
    side = int(limit**0.5) + 1
    with pytest.raises(TooLarge, match="over the limit"):
        decode_image(corpus.raw_png(side, side, 8, 0, [b"\x00"]), limit)
    small = corpus.encode(corpus.picture(8, 8))
    assert decode_image(small, limit).size == (8, 8)


@st.composite
def raw_tensors(draw) -> RawTensor:
    dtype = draw(st.sampled_from(["uint8", "float32", "float64", "int8", ""]))
    shape = tuple(draw(st.lists(st.integers(-3, 70), min_size=0, max_size=5)))
    if draw(st.booleans()) and shape:  # usually make the data match the shape
        count = int(np.prod([max(d, 0) for d in shape]))
        itemsize = 4 if dtype == "float32" else 1
        if count * itemsize <= 200_000:
            if dtype == "float32":
                special = [0.0, 0.5, 1.0, np.nan, np.inf, -np.inf, -1.0, 2.0, 1e30, 3e38]
                values = draw(st.sampled_from(special))
                array = np.full(count, 0.25, "<f4")
                if count:
                    array[draw(st.integers(0, count - 1))] = values
                return RawTensor(dtype, shape, array.tobytes())
            return RawTensor(dtype, shape, bytes(draw(st.integers(0, 255)) for _ in range(1)) * count)
    return RawTensor(dtype, shape, draw(st.binary(max_size=512)))


@given(raw_tensors())
@FAST
def test_raw_tensors_validate_or_raise_invalid_input(raw):
    try:
        out = tensor_from_raw(raw, LIMIT)
    except InvalidInput as exc:
        assert str(exc).startswith("image.tensor"), str(exc)
        return
    assert raw.dtype in ("uint8", "float32")
    if isinstance(out, Image.Image):
        assert out.mode == "RGB"
        assert out.size == (raw.shape[1], raw.shape[0])
    else:
        assert out.dtype == torch.float32 and out.shape == raw.shape
        assert torch.isfinite(out).all()


@given(raw_tensors())
@FAST
def test_preprocess_gives_a_finite_model_input_or_invalid_input(raw):
    try:
        x = preprocess(raw, SPEC)
    except InvalidInput:
        return
    assert x.shape == (3, *SPEC.input_size) and x.dtype == torch.float32
    assert torch.isfinite(x).all(), "a tensor the server accepted must give a finite model input"


@given(valid_images())
@FAST
def test_preprocess_of_any_valid_image_is_finite_and_the_right_shape(case):
    x = preprocess(case[0], SPEC)
    assert x.shape == (3, *SPEC.input_size) and x.dtype == torch.float32
    assert torch.isfinite(x).all()


def test_the_hostile_image_corpus_decodes_as_expected():
    """The same corpus the server test sends, checked at the decoder: fast, and says which case broke."""
    invalid = {corpus.INVALID, corpus.EXHAUSTED}
    for case in corpus.images(LIMIT * 100):
        want = set(case.expect)
        try:
            image = decode_image(case.request.encoded, LIMIT * 100)
        except TooLarge:
            got = corpus.EXHAUSTED
        except InvalidInput:
            got = corpus.INVALID
        else:
            _check_decoded_big(image, LIMIT * 100)
            got = corpus.OK
        # TooLarge is an InvalidInput: either rejection code is fine where a rejection is expected
        assert got in want or (got in invalid and want & invalid), f"{case.name}: got {got}, want {want}"
        if case.reference is not None:
            ref = np.asarray(Image.open(io.BytesIO(case.reference)).convert("RGB"))
            assert np.array_equal(np.asarray(image), ref), f"{case.name}: decoded pixels differ"
        if case.decoy is not None:
            decoy = np.asarray(Image.open(io.BytesIO(case.decoy)).convert("RGB"))
            assert decoy.shape != np.asarray(image).shape or not np.array_equal(np.asarray(image), decoy)


def _check_decoded_big(image: Image.Image, limit: int) -> None:
    assert image.mode == "RGB"
    assert image.size[0] * image.size[1] <= limit


@given(
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    values=st.lists(
        st.floats(width=32, allow_nan=True, allow_infinity=True)
        | st.sampled_from([0.0, 1.0, -0.0, 3e38, -3e38, 1e-45]),
        min_size=1,
        max_size=8,
    ),
)
@FAST
def test_float_tensors_are_refused_or_give_a_finite_model_input(height, width, values):
    """A 3 x H x W float32 tensor with any values in it: InvalidInput, or a finite model input."""
    array = np.full((3, height, width), 0.5, "<f4")
    flat = array.reshape(-1)
    for i, value in enumerate(values):
        flat[(i * 7919) % flat.size] = value
    try:
        x = preprocess(RawTensor("float32", (3, height, width), array.tobytes()), SPEC)
    except InvalidInput as exc:
        assert str(exc).startswith("image.tensor"), str(exc)
        return
    assert torch.isfinite(x).all(), f"accepted values {values} but the model input is not finite"


@pytest.mark.parametrize("limit", [100_000_000, PILLOW_HARD_LIMIT])
@pytest.mark.parametrize("fmt", ["GIF", "JPEG", "BMP", "WEBP"])
def test_headers_beyond_pillows_own_limit_within_ours_neither_warn_nor_fail_as_bombs(fmt, limit):
    """With max_image_pixels above Pillow's process-wide limit (89 M pixels), a header that claims
    more than that but less than ours must reach the decoder: no DecompressionBombWarning (an error
    here), no TooLarge. The pixel data is missing, so the answer is a plain InvalidInput."""
    side = int((limit * 0.9) ** 0.5)
    data = {
        "GIF": lambda: corpus.gif_with_screen(min(side, 65535), min(side, 65535)),
        "JPEG": lambda: corpus.jpeg_with_size(min(side, 65500), min(side, 65500)),
        "BMP": lambda: _bmp_header(side, side),
        "WEBP": lambda: _webp_header(min(side, 16383), min(side, 16383)),
    }[fmt]()
    assert Image.MAX_IMAGE_PIXELS is not None and side * side > Image.MAX_IMAGE_PIXELS
    try:
        image = decode_image(data, limit)
    except TooLarge as exc:
        raise AssertionError(f"{fmt}: refused as too large under a limit of {limit}: {exc}") from None
    except InvalidInput:
        return
    _check_decoded_big(image, limit)


def _bmp_header(width: int, height: int) -> bytes:
    """A 24-bit BMP file header and info header claiming width x height, with no pixel data."""
    import struct

    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    return b"BM" + struct.pack("<IHHI", 14 + len(info), 0, 0, 14 + len(info)) + info


def _webp_header(width: int, height: int) -> bytes:
    """A lossless WebP (VP8L) header claiming width x height (at most 16384), with no image data."""
    import struct

    bits = (width - 1) | ((height - 1) << 14)
    vp8l = b"\x2f" + struct.pack("<I", bits)
    chunk = b"VP8L" + struct.pack("<I", len(vp8l)) + vp8l
    return b"RIFF" + struct.pack("<I", 4 + len(chunk)) + b"WEBP" + chunk


def test_the_pixel_limit_cannot_be_set_beyond_what_every_format_honours():
    assert Limits(max_image_pixels=PILLOW_HARD_LIMIT).max_image_pixels == PILLOW_HARD_LIMIT
    with pytest.raises(ValueError, match="max_image_pixels"):
        load_settings(["--limits.max_image_pixels", str(PILLOW_HARD_LIMIT + 1)])
