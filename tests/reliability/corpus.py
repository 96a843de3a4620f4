"""A corpus of hostile and odd requests, generated at test time (no binary blobs in the repository).

Every `Case` holds one `ClassifyRequest` and the outcomes that are acceptable for it: `OK` (a correct
answer) or a clear `INVALID_ARGUMENT` / `RESOURCE_EXHAUSTED`. A case that is only right if the server
decoded the image a particular way (EXIF orientation, the first GIF frame, 16-bit or CMYK pixels) also
carries `reference`: a plain 8-bit RGB PNG of what the server should have seen, so a test can check that
both get the same prediction.

    images(max_image_pixels)     encoded files: broken, bombs, odd modes, odd shapes
    tensors(max_image_pixels)    raw tensors: NaN/Inf, shapes that don't match their data, bad dtypes
    fields(info)                 the other request fields: top_k, attention, request_id, no image
    oversized(info)              one request just over the server's message size limit
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np
from PIL import Image

from cbam.v1 import inference_pb2 as pb

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED
REJECTED = frozenset({INVALID, EXHAUSTED})

_EXIF_ORIENTATION = 0x0112


@dataclass(frozen=True)
class Case:
    """One request and the status codes that count as a correct reaction to it."""

    name: str
    request: pb.ClassifyRequest
    expect: frozenset[grpc.StatusCode]
    # An RGB PNG the server must classify the same way (only for cases that expect OK).
    reference: bytes | None = None
    # An RGB PNG the server must NOT classify the same way: shows that `reference` can tell them apart.
    decoy: bytes | None = field(default=None, repr=False)

    def __post_init__(self):
        if self.reference is not None and OK not in self.expect:
            raise ValueError(f"case {self.name!r}: a reference only makes sense when OK is expected")


# -- pictures ------------------------------------------------------------------------------------------


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A deterministic, asymmetric H x W x 3 uint8 picture: smooth colour blobs over a gradient."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    out = np.empty((height, width, 3), np.float32)
    for c in range(3):
        out[..., c] = 0.6 * x / max(width - 1, 1) + 0.2 * y / max(height - 1, 1)
        for _ in range(3):
            cx, cy = rng.uniform(0, width), rng.uniform(0, height)
            r = rng.uniform(0.15, 0.4) * max(width, height)
            out[..., c] += rng.uniform(-0.8, 0.8) * np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * r * r))
    # A bright bar in the top-left corner breaks every symmetry (rotations and flips look different).
    out[: max(height // 6, 1), : max(width // 2, 1)] = 1.0
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def encode(image: Image.Image | np.ndarray, fmt: str = "PNG", **params) -> bytes:
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def _rgb_png(image: Image.Image | np.ndarray) -> bytes:
    if isinstance(image, Image.Image):
        image = image.convert("RGB")
    return encode(image, "PNG")


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def raw_png(width: int, height: int, bit_depth: int, colour_type: int, rows: Iterable[bytes]) -> bytes:
    """A PNG written by hand, so the header can claim anything and the pixel data can be anything."""
    compressor = zlib.compressobj(9)
    idat = b"".join(compressor.compress(b"\x00" + row) for row in rows) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def png_bomb(side: int) -> bytes:
    """A 1-bit side x side PNG of zeros: about side**2 / 8200 bytes that decode to side**2 pixels."""
    row = bytes((side + 7) // 8)
    compressor = zlib.compressobj(9)
    chunks = [compressor.compress(b"\x00" + row) for _ in range(side)]
    idat = b"".join(chunks) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )


def jpeg_with_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose frame header (SOF0) then claims width x height."""
    data = bytearray(encode(picture(16, 16), "JPEG", quality=80))
    sof = data.find(b"\xff\xc0")
    # SOF0: marker, length (2), precision (1), height (2), width (2), ...
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def gif_with_screen(width: int, height: int) -> bytes:
    """A 1-frame GIF whose logical screen claims width x height (the frame itself is tiny)."""
    data = bytearray(encode(Image.fromarray(picture(8, 8)).convert("P"), "GIF"))
    struct.pack_into("<HH", data, 6, width, height)
    return bytes(data)


def exif_rotated_jpeg(width: int = 48, height: int = 32) -> tuple[bytes, bytes, bytes]:
    """(jpeg, upright RGB PNG, stored-orientation RGB PNG) for a JPEG whose EXIF says 'rotate me'.

    The pixels are stored turned 90 degrees anticlockwise with orientation 6 ("rotate 90 clockwise to
    display"), so only a decoder that honours EXIF sees the upright picture.
    """
    upright = Image.fromarray(picture(width, height, seed=7))
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[_EXIF_ORIENTATION] = 6
    jpeg = encode(stored, "JPEG", quality=95, exif=exif)
    decoded = Image.open(io.BytesIO(jpeg)).convert("RGB")  # the exact pixels any libjpeg gives
    return jpeg, _rgb_png(decoded.transpose(Image.Transpose.ROTATE_270)), _rgb_png(decoded)


def _animated_gif() -> tuple[bytes, bytes, bytes]:
    """(gif, first frame as RGB PNG, second frame as RGB PNG): the server must classify frame one."""
    frames = [Image.fromarray(picture(32, 32, seed=s)).convert("P") for s in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)
    gif = buf.getvalue()
    opened = Image.open(io.BytesIO(gif))
    first = opened.convert("RGB")
    opened.seek(1)
    second = opened.convert("RGB")
    return gif, _rgb_png(first), _rgb_png(second)


def _sixteen_bit() -> tuple[bytes, bytes, bytes, bytes]:
    """(grey 16-bit PNG, RGB 16-bit PNG, and their 8-bit references).

    The 16-bit values are v * 257, so the most significant byte is the 8-bit picture: a decoder that
    clips 16-bit values at 255 (what Pillow's convert("RGB") does with mode I;16) sees a white image.
    """
    rgb8 = picture(32, 24, seed=3)
    grey8 = np.asarray(Image.fromarray(rgb8).convert("L"))
    grey16 = (grey8.astype(">u2") * 257).tobytes()
    grey_png = raw_png(32, 24, 16, 0, (grey16[i * 64 : (i + 1) * 64] for i in range(24)))
    rgb16 = (rgb8.astype(">u2") * 257).tobytes()
    rgb_png = raw_png(32, 24, 16, 2, (rgb16[i * 192 : (i + 1) * 192] for i in range(24)))
    return grey_png, _rgb_png(np.repeat(grey8[..., None], 3, axis=2)), rgb_png, _rgb_png(rgb8)


def _encoded(name, data: bytes, expect, reference=None, decoy=None) -> Case:
    return Case(name, pb.ClassifyRequest(request_id=name, encoded=data), frozenset(expect), reference, decoy)


def images(max_image_pixels: int) -> list[Case]:
    """Encoded image files: broken ones, bombs, every odd mode and shape a decoder meets."""
    base = picture(40, 30)
    base_png = encode(base, "PNG")
    base_jpeg = encode(base, "JPEG", quality=90)
    rng = np.random.default_rng(1234)
    cases = [
        # broken files
        _encoded("empty", b"", [INVALID]),
        _encoded("one-byte", b"\xff", [INVALID]),
        _encoded("random-bytes", rng.bytes(4096), [INVALID]),
        _encoded("text", b"<svg xmlns='http://www.w3.org/2000/svg'/>", [INVALID]),
        _encoded("jpeg-header-only", base_jpeg[:20], [INVALID]),
        _encoded("jpeg-truncated", base_jpeg[: len(base_jpeg) // 2], [INVALID]),
        _encoded("png-header-only", base_png[:33], [INVALID]),
        _encoded("png-truncated", base_png[: len(base_png) // 2], [INVALID]),
        _encoded("png-bad-crc", base_png[:29] + b"\x00\x00\x00\x00" + base_png[33:], [INVALID]),
        _encoded("png-zero-width", raw_png(0, 4, 8, 0, [b""] * 4), [INVALID]),
        # Pillow fills rows missing from a complete zlib stream with zeros: a partial picture, or a refusal.
        _encoded("png-rows-missing", raw_png(64, 64, 8, 0, [bytes(64)] * 3), [OK, INVALID]),
        # valid headers with absurd dimensions, and decompression bombs
        _encoded("png-header-2^31", raw_png(2**31 - 1, 2**31 - 1, 8, 2, [bytes(9)]), REJECTED),
        _encoded("png-header-over-limit", raw_png(max_image_pixels + 1, 1, 8, 0, [b"\x00"]), REJECTED),
        _encoded("jpeg-header-65500^2", jpeg_with_size(65500, 65500), REJECTED),
        _encoded("gif-screen-65535^2", gif_with_screen(65535, 65535), REJECTED),
        _encoded("png-bomb-30000^2", png_bomb(30000), REJECTED),
    ]
    # A bomb just above the configured limit (but far below Pillow's own 2x cut-off for the default).
    side = int(max_image_pixels**0.5) + 16
    cases.append(_encoded(f"png-bomb-{side}^2", png_bomb(side), REJECTED))

    # tiny and extreme shapes
    cases += [
        _encoded("1x1-png", encode(picture(1, 1)), [OK]),
        _encoded("1x1-jpeg", encode(picture(1, 1), "JPEG"), [OK]),
        _encoded("1x1-gif", encode(Image.fromarray(picture(1, 1)).convert("P"), "GIF"), [OK]),
        _encoded("wide-8000x1", encode(picture(8000, 1)), [OK]),
        _encoded("tall-1x8000", encode(picture(1, 8000)), [OK]),
        _encoded("wide-4000x3-jpeg", encode(picture(4000, 3), "JPEG"), [OK]),
    ]

    # every mode, with what the server should have seen
    rgb = Image.fromarray(base)
    opaque = rgb.convert("RGBA")
    cmyk_jpeg = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    grey16, grey16_ref, rgb16, rgb16_ref = _sixteen_bit()
    cases += [
        _encoded("rgb-png", base_png, [OK], _rgb_png(rgb)),
        _encoded("grey-png", encode(rgb.convert("L")), [OK], _rgb_png(rgb.convert("L"))),
        _encoded("grey-jpeg", encode(rgb.convert("L"), "JPEG", quality=95), [OK]),
        _encoded("bilevel-png", encode(rgb.convert("1")), [OK], _rgb_png(rgb.convert("1"))),
        _encoded("palette-png", encode(rgb.convert("P")), [OK], _rgb_png(rgb.convert("P"))),
        _encoded("palette-gif", encode(rgb.convert("P"), "GIF"), [OK]),
        _encoded("rgba-opaque-png", encode(opaque), [OK], _rgb_png(rgb)),
        _encoded("la-opaque-png", encode(rgb.convert("LA")), [OK], _rgb_png(rgb.convert("L"))),
        _encoded("rgba-transparent-png", encode(_half_transparent(rgb)), [OK]),
        _encoded("cmyk-jpeg", cmyk_jpeg, [OK], _rgb_png(Image.open(io.BytesIO(cmyk_jpeg)))),
        _encoded("grey-16bit-png", grey16, [OK], grey16_ref),
        _encoded("rgb-16bit-png", rgb16, [OK], rgb16_ref),
        _encoded("webp", encode(rgb, "WEBP", lossless=True), [OK], _rgb_png(rgb)),
        _encoded("bmp", encode(rgb, "BMP"), [OK], _rgb_png(rgb)),
        _encoded("progressive-jpeg", encode(rgb, "JPEG", progressive=True), [OK]),
        _encoded("tiff", encode(rgb, "TIFF"), [OK, INVALID]),
    ]
    jpeg, upright, stored = exif_rotated_jpeg()
    cases.append(_encoded("exif-rotated-jpeg", jpeg, [OK], upright, decoy=stored))
    gif, first, second = _animated_gif()
    cases.append(_encoded("animated-gif", gif, [OK], first, decoy=second))
    return cases


def _half_transparent(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    alpha = np.zeros(rgba.size[::-1], np.uint8)
    alpha[:, : rgba.size[0] // 2] = 255
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


# -- raw tensors ---------------------------------------------------------------------------------------


def _tensor(name, dtype, shape, data: bytes, expect) -> Case:
    tensor = pb.Tensor(dtype=dtype, shape=list(shape), data=data)
    return Case(name, pb.ClassifyRequest(request_id=name, tensor=tensor), frozenset(expect))


def tensors(max_image_pixels: int) -> list[Case]:
    """Raw tensors: good ones, non-finite floats, shapes that don't match their data, bad dtypes."""
    u8, f32 = pb.Tensor.DTYPE_UINT8, pb.Tensor.DTYPE_FLOAT32
    hwc = picture(12, 10)
    chw = (hwc.transpose(2, 0, 1).astype("<f4") / 255).copy()

    def floats_with(value):
        bad = chw.copy()
        bad[1, 4, 5] = value
        return bad.tobytes()

    side = int(max_image_pixels**0.5) + 1
    return [
        _tensor("uint8-rgb", u8, (10, 12, 3), hwc.tobytes(), [OK]),
        _tensor("uint8-grey", u8, (10, 12, 1), hwc[..., :1].tobytes(), [OK]),
        _tensor("uint8-rgba", u8, (10, 12, 4), np.dstack([hwc, hwc[..., :1]]).tobytes(), [OK]),
        _tensor("uint8-1x1", u8, (1, 1, 3), b"\x80\x80\x80", [OK]),
        _tensor("float32-chw", f32, (3, 10, 12), chw.tobytes(), [OK]),
        _tensor("float32-nan", f32, (3, 10, 12), floats_with(np.nan), [INVALID]),
        _tensor("float32-inf", f32, (3, 10, 12), floats_with(np.inf), [INVALID]),
        _tensor("float32-minus-inf", f32, (3, 10, 12), floats_with(-np.inf), [INVALID]),
        _tensor("float32-huge", f32, (3, 10, 12), floats_with(3e38), [INVALID]),
        _tensor("float32-below-0", f32, (3, 10, 12), floats_with(-0.01), [INVALID]),
        _tensor("float32-above-1", f32, (3, 10, 12), floats_with(1.01), [INVALID]),
        _tensor("float32-bounds", f32, (3, 10, 12), floats_with(1.0)[: 4 * 60] + bytes(4 * 300), [OK]),
        _tensor("float32-hwc-layout", f32, (10, 12, 3), chw.tobytes(), [INVALID]),
        _tensor("float32-odd-length", f32, (3, 10, 12), chw.tobytes()[:-1], [INVALID]),
        _tensor("uint8-data-short", u8, (10, 12, 3), hwc.tobytes()[:-1], [INVALID]),
        _tensor("uint8-data-long", u8, (10, 12, 3), hwc.tobytes() + b"\x00", [INVALID]),
        _tensor("uint8-no-data", u8, (10, 12, 3), b"", [INVALID]),
        _tensor("uint8-2-channels", u8, (10, 12, 2), hwc[..., :2].tobytes(), [INVALID]),
        _tensor("uint8-2d", u8, (10, 36), hwc.tobytes(), [INVALID]),
        _tensor("uint8-4d", u8, (1, 10, 12, 3), hwc.tobytes(), [INVALID]),
        _tensor("uint8-no-shape", u8, (), hwc.tobytes(), [INVALID]),
        _tensor("uint8-zero-dim", u8, (0, 12, 3), b"", [INVALID]),
        _tensor("uint8-negative-dim", u8, (-10, -12, 3), hwc.tobytes(), [INVALID]),
        _tensor("uint8-product-overflows", u8, (2**62, 2**62, 3), hwc.tobytes(), REJECTED),
        _tensor("uint8-int64-max", u8, (2**63 - 1, 1, 3), b"", REJECTED),
        _tensor("uint8-over-pixel-limit", u8, (side, side, 1), b"", REJECTED),
        _tensor("dtype-unspecified", pb.Tensor.DTYPE_UNSPECIFIED, (10, 12, 3), hwc.tobytes(), [INVALID]),
        _tensor("dtype-unknown-7", 7, (10, 12, 3), hwc.tobytes(), [INVALID]),
        _tensor("dtype-negative", -1, (10, 12, 3), hwc.tobytes(), [INVALID]),
    ]


# -- other fields --------------------------------------------------------------------------------------


def _good_image() -> bytes:
    return encode(picture(20, 20, seed=5))


def fields(info: pb.ModelInfo) -> list[Case]:
    """top_k, attention and request_id at and beyond their limits, and a request with no image."""
    classes = len(info.labels)
    img = _good_image()
    blocks = list(info.attention_blocks)

    def req(name, expect, **kwargs) -> Case:
        kwargs.setdefault("request_id", name)
        return Case(name, pb.ClassifyRequest(encoded=img, **kwargs), frozenset(expect))

    def att(kind=pb.ATTENTION_KIND_NONE, **kwargs) -> pb.AttentionRequest:
        return pb.AttentionRequest(kind=kind, **kwargs)

    channel, spatial, both = pb.ATTENTION_KIND_CHANNEL, pb.ATTENTION_KIND_SPATIAL, pb.ATTENTION_KIND_BOTH
    cases = [
        Case("no-image", pb.ClassifyRequest(request_id="no-image", top_k=1), frozenset([INVALID])),
        req("top_k-0", [OK], top_k=0),
        req("top_k-1", [OK], top_k=1),
        req("top_k-classes", [OK], top_k=classes),
        req("top_k-classes+1", [INVALID], top_k=classes + 1),
        req("top_k-million", [INVALID], top_k=1_000_000),
        req("top_k-uint32-max", [INVALID], top_k=2**32 - 1),
        req("attention-none", [OK], attention=att()),
        req("attention-both-png", [OK], attention=att(both, format=pb.ATTENTION_FORMAT_PNG)),
        req("attention-kind-99", [INVALID], attention=att(99)),
        req("attention-kind-negative", [INVALID], attention=att(-5)),
        req("attention-format-99", [INVALID], attention=att(spatial, format=99)),
        req("attention-unknown-block", [INVALID], attention=att(channel, blocks=["nope"])),
        req("attention-empty-block-name", [INVALID], attention=att(channel, blocks=[""])),
        req("attention-block-repeated", [OK, INVALID],
            attention=att(spatial, blocks=blocks[:1] * 50)),
        req("attention-10k-blocks", [INVALID, EXHAUSTED],
            attention=att(spatial, blocks=[f"x{i}" for i in range(10_000)])),
        req("request_id-empty", [OK], request_id=""),
        req("request_id-128", [OK], request_id="r" * 128),
        req("request_id-129", [INVALID], request_id="r" * 129),
        req("request_id-100k", [INVALID], request_id="r" * 100_000),
        req("request_id-unicode", [OK, INVALID], request_id="\u00e9\u4e2d\U0001f600\u200b"),
        req("request_id-nul", [OK, INVALID], request_id="a\x00b"),
    ]
    if blocks:
        cases.append(req("attention-one-block", [OK],
                         attention=att(channel, blocks=blocks[-1:])))
    return cases


def oversized(info: pb.ModelInfo) -> Case:
    """A request one kilobyte over the server's message size limit: gRPC itself rejects it."""
    size = int(info.max_message_bytes) + 1024
    request = pb.ClassifyRequest(request_id="oversized", encoded=b"\x89PNG" + bytes(size))
    return Case("oversized-message", request, frozenset([EXHAUSTED]))


def everything(info: pb.ModelInfo) -> list[Case]:
    """The whole corpus, for a server described by `info`."""
    limit = int(info.max_image_pixels)
    return images(limit) + tensors(limit) + fields(info) + [oversized(info)]
