"""Pictures of attention maps, drawn with Pillow: spatial maps blended on the input, channel bars."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ._types import Prediction

__all__ = ["channel_chart", "colorize", "save_attention_pictures", "spatial_grid", "spatial_overlay"]

# Matplotlib's viridis sampled at nine points: perceptually uniform and readable in grey.
_VIRIDIS = np.array(
    [
        (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
        (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
    ],
    dtype=np.float32,
)
_LUT = np.stack(
    [np.interp(np.linspace(0, 1, 256), np.linspace(0, 1, len(_VIRIDIS)), _VIRIDIS[:, c]) for c in range(3)],
    axis=1,
).astype(np.uint8)
_MIN_SIDE = 256  # small inputs (32 x 32 digits) are enlarged so the overlay is worth looking at
_TILE = 160
_FONT = ImageFont.load_default()


def colorize(values: np.ndarray) -> Image.Image:
    """An RGB image of a 2-D array, stretched to its own min..max, through the viridis colormap."""
    low, high = float(values.min()), float(values.max())
    scaled = (values - low) / (high - low) if high > low else np.zeros_like(values)
    return Image.fromarray(_LUT[np.round(scaled * 255).astype(np.uint8)], "RGB")


def spatial_overlay(image: Image.Image, spatial: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """The spatial map upscaled (bilinear) to the image, coloured, and blended on it with `alpha`."""
    image = _display_size(image.convert("RGB"))
    heat = colorize(spatial).resize(image.size, Image.Resampling.BILINEAR)
    return Image.blend(image, heat, alpha)


def spatial_grid(overlays: dict[str, Image.Image], columns: int = 4) -> Image.Image:
    """Every block's overlay as a captioned tile, in network order, `columns` to a row."""
    columns = max(1, min(columns, len(overlays)))
    rows = -(-len(overlays) // columns)
    caption = 14
    grid = Image.new("RGB", (columns * _TILE, rows * (_TILE + caption)), "white")
    draw = ImageDraw.Draw(grid)
    for i, (block, overlay) in enumerate(overlays.items()):
        x, y = (i % columns) * _TILE, (i // columns) * (_TILE + caption)
        draw.text((x + 3, y + 1), block, fill="black", font=_FONT)
        grid.paste(overlay.resize((_TILE, _TILE), Image.Resampling.BILINEAR), (x, y + caption))
    return grid


def channel_chart(channel: dict[str, np.ndarray], width: int = 640, panel_height: int = 64) -> Image.Image:
    """One bar chart per block: a bar per channel, height = its weight on a fixed 0..1 axis."""
    title, margin = 14, 4
    chart = Image.new("RGB", (width, len(channel) * (panel_height + title + margin)), "white")
    draw = ImageDraw.Draw(chart)
    for row, (block, weights) in enumerate(channel.items()):
        top = row * (panel_height + title + margin)
        base = top + title + panel_height
        label = f"{block}  C={weights.size}  mean={weights.mean():.3f}"
        draw.text((3, top + 1), label, fill="black", font=_FONT)
        draw.rectangle((0, top + title, width - 1, base), outline=(200, 200, 200))
        colors = _LUT[np.clip(np.round(weights * 255), 0, 255).astype(np.uint8)]
        bar = max(1, width // weights.size)
        for i, (value, color) in enumerate(zip(weights, colors, strict=True)):
            x = i * width // weights.size
            height = round(float(np.clip(value, 0, 1)) * (panel_height - 2))
            draw.rectangle((x, base - height, x + bar - 1, base), fill=tuple(int(c) for c in color))
    return chart


def save_attention_pictures(prediction: Prediction, image: Image.Image, folder: Path) -> list[Path]:
    """Write the pictures of one prediction's attention into `folder`; return the files written.

    spatial_<block>.png per block with a spatial map, spatial_grid.png of them all, channel.png.
    """
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    overlays = {}
    for block, maps in prediction.attention.items():
        if "spatial" in maps:
            overlays[block] = spatial_overlay(image, maps["spatial"])
            written.append(folder / f"spatial_{block}.png")
            overlays[block].save(written[-1])
    if overlays:
        written.append(folder / "spatial_grid.png")
        spatial_grid(overlays).save(written[-1])
    channel = {block: maps["channel"] for block, maps in prediction.attention.items() if "channel" in maps}
    if channel:
        written.append(folder / "channel.png")
        channel_chart(channel).save(written[-1])
    return written


def _display_size(image: Image.Image) -> Image.Image:
    short = min(image.size)
    if short >= _MIN_SIDE:
        return image
    scale = -(-_MIN_SIDE // short)
    return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
