"""Pictures of one prediction's attention, drawn with matplotlib (the `load` extra). matplotlib is imported
only when a picture is drawn, so classifying never needs it.

attention_figure(prediction, image):

    +-----------------------+------------------------------------------------+
    | the input             | top-k labels: probability bars, with values    |
    +-----------------------+-----------------------+------------------------+
    | block: spatial map     | block: the map alone, | block: channel weights |  one row per block,
    | blended on the input   | at its own resolution | (channel index, weight)|  in network order
    +------------------------+-----------------------+------------------------+
                               one colour bar: the scale of every spatial map, with its range
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ._images import ImageInput, open_image
from ._types import Prediction

__all__ = [
    "FIGURE_FORMATS",
    "AttentionPictures",
    "attention_figure",
    "colormap",
    "require_matplotlib",
    "save_attention_pictures",
    "shared_range",
    "spatial_overlay",
]

FIGURE_FORMATS = ("png", "svg")
_DPI = 100  # the figure is laid out in inches at this many pixels per inch: 10 in = 1000 px wide
_THUMBNAIL = 128  # short side of the gallery's pictures, in pixels


def require_matplotlib():
    """The matplotlib module; ImportError naming the extra to install when it is missing."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ImportError(
            "attention figures are drawn with matplotlib, which is not installed: "
            "pip install 'cbam-serve[load]' (or pip install matplotlib)"
        ) from exc
    return matplotlib


def attention_figure(
    prediction: Prediction,
    image: ImageInput,
    *,
    blocks: Sequence[str] | None = None,
    cmap: str = "viridis",
    value_range: tuple[float, float] | None = None,
    title: str | None = None,
):
    """One matplotlib Figure of a prediction and its attention: the input, the top-k labels, and per block
    the spatial map upscaled and blended on the input, the map alone, and the channel weights.

    `image` is what was classified (path, bytes, PIL image or array). `blocks` picks blocks (default:
    every block the prediction has maps for). Every spatial map shares one colour scale (`cmap`, any
    matplotlib colour map name), from `value_range` or else from the lowest to the highest value shown.
    Save it with `figure.savefig("out.png")` (or .svg, .pdf). Raises ValueError for a block or colour
    map it does not know, an empty value_range, or a prediction without attention; ImportError without
    matplotlib.
    """
    require_matplotlib()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.figure import Figure

    colours = colormap(cmap)
    names = _chosen_blocks(prediction, blocks)
    spatial = {b: prediction.attention[b]["spatial"] for b in names if "spatial" in prediction.attention[b]}
    low, high = value_range if value_range is not None else shared_range(spatial.values())
    if not low < high:
        raise ValueError(f"value_range should be (low, high) with low < high, got {value_range}")
    picture = open_image(image)
    shown = _display_size(picture, short=256, long=512)

    figure = Figure(figsize=(10, 2.6 + 2.4 * len(names)), dpi=_DPI, layout="constrained")
    grid = figure.add_gridspec(1 + len(names), 3, width_ratios=(1, 1, 1.6))
    if title:
        figure.suptitle(title, fontsize=13)
    axes = figure.add_subplot(grid[0, 0])
    axes.imshow(shown, interpolation="nearest")
    _no_ticks(axes, f"input, {picture.width}x{picture.height} px")
    _draw_top_k(figure.add_subplot(grid[0, 1:]), prediction, colours)

    map_axes = []
    for row, block in enumerate(names, start=1):
        maps = prediction.attention[block]
        overlay_axes, alone_axes = figure.add_subplot(grid[row, 0]), figure.add_subplot(grid[row, 1])
        if "spatial" in maps:
            overlay = spatial_overlay(shown, maps["spatial"], value_range=(low, high), cmap=cmap)
            overlay_axes.imshow(overlay, interpolation="nearest")
            _no_ticks(overlay_axes, f"{block} on the input")
            height, width = maps["spatial"].shape
            alone_axes.imshow(
                maps["spatial"], cmap=colours, vmin=low, vmax=high, interpolation="nearest",
                extent=(0, shown.width, shown.height, 0),
            )  # fmt: skip
            _no_ticks(alone_axes, f"{block} alone, {width}x{height}")
            map_axes += [overlay_axes, alone_axes]
        else:
            for axes in (overlay_axes, alone_axes):
                _nothing(axes, f"{block}: no spatial map")
        channel_axes = figure.add_subplot(grid[row, 2])
        if "channel" in maps:
            _draw_channel(channel_axes, block, maps["channel"], colours)
        else:
            _nothing(channel_axes, f"{block}: no channel weights")
    if map_axes:
        bar = figure.colorbar(
            ScalarMappable(Normalize(low, high), colours), ax=map_axes, location="bottom", aspect=40
        )
        bar.set_label(f"spatial attention: one colour scale for every map, {low:.3f} to {high:.3f}")
    return figure


def spatial_overlay(
    image: Image.Image,
    spatial: np.ndarray,
    *,
    value_range: tuple[float, float],
    cmap: str = "viridis",
    alpha: float = 0.5,
) -> Image.Image:
    """The spatial map upscaled (bilinear) to `image`'s size, coloured on `value_range` and blended on
    the image with `alpha`."""
    low, high = value_range
    heat = Image.fromarray(np.asarray(spatial, dtype=np.float32), "F").resize(
        image.size, Image.Resampling.BILINEAR
    )
    scaled = np.clip((np.asarray(heat) - low) / (high - low), 0.0, 1.0)
    heat = np.round(colormap(cmap)(scaled)[..., :3] * 255).astype(np.uint8)
    return Image.blend(image.convert("RGB"), Image.fromarray(heat, "RGB"), alpha)


def shared_range(maps: Iterable[np.ndarray]) -> tuple[float, float]:
    """The lowest and highest value of all `maps` (widened a little when they are all one value)."""
    maps = list(maps)
    if not maps:
        return 0.0, 1.0
    low, high = min(float(m.min()) for m in maps), max(float(m.max()) for m in maps)
    return (low - 0.01, high + 0.01) if high - low < 1e-6 else (low, high)


@dataclass(frozen=True)
class AttentionPictures:
    """The files save_attention_pictures wrote for one image, and the colour scale they share."""

    figure: Path
    thumbnail: Path
    overlays: dict[str, Path]  # block -> the spatial map blended on the input, small
    value_range: tuple[float, float]


def save_attention_pictures(
    prediction: Prediction,
    image: ImageInput,
    folder: Path,
    *,
    blocks: Sequence[str] | None = None,
    cmap: str = "viridis",
    figure_format: str = "png",
    title: str | None = None,
) -> AttentionPictures:
    """Write into `folder`: figure.<format> (attention_figure), input.png (a thumbnail), and
    overlay_<block>.png per block with a spatial map, all on one colour scale."""
    if figure_format not in FIGURE_FORMATS:
        raise ValueError(f"figure_format should be one of {FIGURE_FORMATS}, got {figure_format!r}")
    names = _chosen_blocks(prediction, blocks)
    spatial = {b: prediction.attention[b]["spatial"] for b in names if "spatial" in prediction.attention[b]}
    value_range = shared_range(spatial.values())
    picture = open_image(image)
    folder.mkdir(parents=True, exist_ok=True)

    figure = attention_figure(
        prediction, picture, blocks=names, cmap=cmap, value_range=value_range, title=title
    )
    figure_path = folder / f"figure.{figure_format}"
    figure.savefig(figure_path, format=figure_format, dpi=_DPI)
    small = _display_size(picture, short=_THUMBNAIL, long=2 * _THUMBNAIL)
    thumbnail = folder / "input.png"
    small.save(thumbnail)
    overlays = {}
    for block, values in spatial.items():
        overlays[block] = folder / f"overlay_{block}.png"
        spatial_overlay(small, values, value_range=value_range, cmap=cmap).save(overlays[block])
    return AttentionPictures(figure_path, thumbnail, overlays, value_range)


def _chosen_blocks(prediction: Prediction, blocks: Sequence[str] | None) -> list[str]:
    if not prediction.attention:
        raise ValueError("the prediction carries no attention maps: classify with attention='both'")
    if blocks is None:
        return list(prediction.attention)
    unknown = [b for b in blocks if b not in prediction.attention]
    if unknown or not blocks:
        known = list(prediction.attention)
        raise ValueError(f"blocks should name some of the prediction's blocks {known}, got {list(blocks)}")
    return [b for b in prediction.attention if b in blocks]  # network order


def colormap(name: str):
    """The matplotlib colour map `name`; ValueError for a name it does not know, ImportError (naming the
    extra) without matplotlib."""
    try:
        return require_matplotlib().colormaps[name]
    except KeyError:
        choices = "viridis, magma, inferno, cividis, gray, ... (matplotlib.colormaps)"
        raise ValueError(f"unknown colour map {name!r}; choose one of {choices}") from None


def _display_size(image: Image.Image, *, short: int, long: int) -> Image.Image:
    """Small inputs (32 x 32 digits) enlarged by a whole factor to `short` pixels or more, so every input
    pixel stays a crisp square; large ones shrunk to at most `long`."""
    if min(image.size) < short:
        scale = -(-short // min(image.size))
        return image.resize((image.width * scale, image.height * scale), Image.Resampling.NEAREST)
    if max(image.size) > long:
        image = image.copy()
        image.thumbnail((long, long), Image.Resampling.LANCZOS)
    return image


def _draw_top_k(axes, prediction: Prediction, colours) -> None:
    labels = prediction.labels[::-1]  # most probable at the top
    probabilities = [label.probability for label in labels]
    rows = range(len(labels))
    axes.barh(rows, probabilities, color=colours(0.35), height=0.7)
    axes.set_yticks(rows, [label.name for label in labels])
    axes.set_xlim(0, 1)
    axes.set_xlabel("probability")
    for row, probability in zip(rows, probabilities, strict=True):
        inside = probability > 0.8
        axes.text(
            probability - 0.01 if inside else probability + 0.01, row, f"{probability:.3f}",
            va="center", ha="right" if inside else "left", color="white" if inside else "black",
        )  # fmt: skip
    top = prediction.top
    axes.set_title(f"top {len(labels)}: {top.name} ({top.probability:.1%})")


def _draw_channel(axes, block: str, weights: np.ndarray, colours) -> None:
    from matplotlib.ticker import MaxNLocator

    mean = float(weights.mean())
    axes.bar(np.arange(weights.size), weights, width=1.0, color=colours(0.35), linewidth=0)
    axes.axhline(mean, color="0.2", linestyle="--", linewidth=1)
    axes.text(
        0.99, mean, f"mean {mean:.2f}", transform=axes.get_yaxis_transform(), ha="right", va="bottom",
        fontsize=9, bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1},
    )  # fmt: skip
    axes.set_xlim(-0.5, weights.size - 0.5)
    axes.set_ylim(0, 1)
    axes.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    axes.set_xlabel("channel index")
    axes.set_ylabel("weight")
    axes.set_title(f"{block}: channel attention, {weights.size} channels")


def _no_ticks(axes, title: str) -> None:
    axes.set_xticks([])
    axes.set_yticks([])
    axes.set_title(title)


def _nothing(axes, title: str) -> None:
    axes.axis("off")
    axes.set_title(title, color="0.4")
