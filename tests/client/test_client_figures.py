"""attention_figure and the pictures `--attention` writes: what they show, on one colour scale, and that
the client works without matplotlib until it is asked to draw."""

import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from client import LabelScore, Prediction, attention_figure
from client._figures import save_attention_pictures, shared_range, spatial_overlay

pytest.importorskip("matplotlib", reason="figures are drawn with matplotlib (the load extra)")

BLOCKS = ("layer1.0", "layer2.0", "layer3.0")


def prediction(rng=None) -> Prediction:
    """Three blocks like the default model's: 16/32/64 channels, 32x32/16x16/8x8 maps on 0.2..0.9."""
    rng = rng or np.random.default_rng(0)
    attention = {}
    for i, block in enumerate(BLOCKS):
        spatial = rng.uniform(0.3, 0.8, (32 >> i, 32 >> i)).astype(np.float32)
        spatial[0, 0], spatial[-1, -1] = (0.2, 0.6) if i == 0 else (0.5, 0.9)  # the extremes: 0.2 and 0.9
        attention[block] = {"channel": rng.random(16 << i).astype(np.float32), "spatial": spatial}
    labels = [LabelScore(3, "three", 0.91), LabelScore(8, "eight", 0.06), LabelScore(5, "five", 0.02)]
    return Prediction("0", labels, attention)


def digit() -> Image.Image:
    image = Image.new("L", (32, 32))
    image.paste(255, (10, 4, 22, 28))
    return image


def texts(figure) -> list[str]:
    return [t.get_text() for t in figure.findobj(lambda a: hasattr(a, "get_text"))]


def test_one_figure_shows_the_input_the_top_k_and_every_block_on_one_colour_scale():
    figure = attention_figure(prediction(), digit(), title="digit.png")
    words = " ".join(texts(figure))
    assert "digit.png" in words and "input, 32x32 px" in words and "top 3: three (91.0%)" in words
    for label in ("three", "eight", "five", "0.910", "0.060", "0.020"):
        assert label in texts(figure)
    for block, side, channels in zip(BLOCKS, (32, 16, 8), (16, 32, 64), strict=True):
        assert f"{block} on the input" in words and f"{block} alone, {side}x{side}" in words
        assert f"{block}: channel attention, {channels} channels" in words
    charts = [a for a in figure.axes if a.get_xlabel() == "channel index"]
    assert len(charts) == 3 and all(a.get_ylabel() == "weight" and a.get_ylim() == (0, 1) for a in charts)
    assert [len(a.patches) for a in charts] == [16, 32, 64]  # a bar per channel
    maps = [image for a in figure.axes for image in a.get_images() if image.get_array().ndim == 2]
    assert len(maps) == 3
    assert all(image.get_clim() == pytest.approx((0.2, 0.9)) for image in maps)  # one scale for all
    bar_label = "spatial attention: one colour scale for every map, 0.200 to 0.900"
    colour_bars = [a for a in figure.axes if a.get_xlabel() == bar_label]
    assert len(colour_bars) == 1


def test_blocks_and_colour_map_are_chosen_and_checked():
    figure = attention_figure(prediction(), digit(), blocks=["layer3.0", "layer1.0"], cmap="magma")
    words = " ".join(texts(figure))
    assert "layer1.0 on the input" in words and "layer3.0 on the input" in words
    assert "layer2.0" not in words
    maps = [image for a in figure.axes for image in a.get_images() if image.get_array().ndim == 2]
    assert {image.get_cmap().name for image in maps} == {"magma"}
    with pytest.raises(ValueError, match=r"blocks should name some of .*'layer1.0'.* got \['layer9'\]"):
        attention_figure(prediction(), digit(), blocks=["layer9"])
    with pytest.raises(ValueError, match="unknown colour map 'no-such-map'"):
        attention_figure(prediction(), digit(), cmap="no-such-map")
    with pytest.raises(ValueError, match=r"value_range should be \(low, high\) with low < high, got"):
        attention_figure(prediction(), digit(), value_range=(1, 1))
    with pytest.raises(ValueError, match="no attention maps: classify with attention='both'"):
        attention_figure(Prediction("0", [LabelScore(1, "one", 1.0)]), digit())


def test_a_block_without_one_kind_of_map_says_so():
    only_channel = prediction()
    for maps in only_channel.attention.values():
        del maps["spatial"]
    words = " ".join(texts(attention_figure(only_channel, digit())))
    assert "layer1.0: no spatial map" in words and "layer1.0: channel attention, 16 channels" in words


def test_overlay_is_the_map_upscaled_coloured_on_the_given_range_and_blended():
    spatial = np.zeros((8, 8), np.float32)
    spatial[:4] = 1.0  # top half attended
    overlay = np.asarray(spatial_overlay(Image.new("RGB", (64, 64), "white"), spatial, value_range=(0, 1)))
    assert overlay.shape == (64, 64, 3)
    assert overlay[2, 32].tolist() == [254, 243, 146]  # white blended with viridis' yellow (its top)
    assert overlay[61, 32].tolist() == [161, 128, 169]  # white blended with viridis' purple (its bottom)
    dimmer = np.asarray(spatial_overlay(Image.new("RGB", (64, 64), "white"), spatial, value_range=(0, 2)))
    assert dimmer[2, 32].tolist() != overlay[2, 32].tolist()  # the same value, coloured on a wider scale
    assert shared_range([np.array([0.3, 0.5]), np.array([0.2, 0.4])]) == (pytest.approx(0.2), 0.5)


@pytest.mark.parametrize("figure_format", ["png", "svg"])
def test_pictures_of_one_prediction(tmp_path, figure_format):
    pictures = save_attention_pictures(
        prediction(), digit(), tmp_path / "digit", figure_format=figure_format, title="digit"
    )
    assert sorted(p.name for p in (tmp_path / "digit").iterdir()) == sorted(
        [f"figure.{figure_format}", "input.png"] + [f"overlay_{b}.png" for b in BLOCKS]
    )
    assert pictures.value_range == (pytest.approx(0.2), pytest.approx(0.9))
    if figure_format == "png":
        with Image.open(pictures.figure) as figure:
            assert figure.width == 1000 and figure.height > 900  # 10 in at 100 dpi; a row per block
    else:
        assert pictures.figure.read_text().lstrip().startswith("<?xml")
    with Image.open(pictures.thumbnail) as thumbnail, Image.open(pictures.overlays["layer3.0"]) as overlay:
        assert thumbnail.size == overlay.size == (128, 128)  # a 32 x 32 input enlarged 4x, pixels kept square


def test_without_matplotlib_the_client_classifies_and_drawing_names_the_extra():
    code = (
        "import sys; sys.modules['matplotlib'] = None\n"  # as if it were not installed
        "import numpy as np, client\n"
        "maps = {'b': {'spatial': np.ones((2, 2))}}\n"
        "p = client.Prediction('0', [client.LabelScore(1, 'one', 1.0)], maps)\n"
        "try:\n"
        "    client.attention_figure(p, np.zeros((4, 4), np.uint8))\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "pip install 'cbam-serve[load]'" in done.stdout
