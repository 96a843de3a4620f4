import numpy as np
from PIL import Image

from client import LabelScore, Prediction
from client._overlays import channel_chart, colorize, save_attention_pictures, spatial_overlay


def test_colorize_stretches_the_map_over_the_colormap():
    picture = np.asarray(colorize(np.array([[0.2, 0.6]])))
    assert picture.shape == (1, 2, 3)
    assert tuple(picture[0, 0]) == (68, 1, 84) and tuple(picture[0, 1]) == (253, 231, 37)  # viridis ends
    flat = np.asarray(colorize(np.full((2, 2), 0.5))).reshape(-1, 3)
    assert len(np.unique(flat, axis=0)) == 1  # a flat map is one colour


def test_overlay_is_the_image_enlarged_with_the_map_blended_on():
    image = Image.new("RGB", (32, 32), "white")
    spatial = np.zeros((8, 8))
    spatial[:4] = 1.0  # top half attended
    overlay = np.asarray(spatial_overlay(image, spatial, alpha=0.5)).astype(int)
    assert overlay.shape == (256, 256, 3)  # small inputs are enlarged to a readable size
    assert overlay[10, 128].tolist() == [254, 243, 146]  # white blended with viridis' yellow
    assert overlay[245, 128].tolist() == [161, 128, 169]  # white blended with viridis' purple


def test_pictures_of_one_prediction(tmp_path):
    rng = np.random.default_rng(0)
    prediction = Prediction(
        request_id="0",
        labels=[LabelScore(1, "one", 0.9)],
        attention={
            "layer1.0": {"channel": rng.random(16), "spatial": rng.random((32, 32))},
            "layer2.0": {"channel": rng.random(2048), "spatial": rng.random((16, 16))},
        },
    )
    written = save_attention_pictures(prediction, Image.new("L", (40, 30)), tmp_path / "x")
    assert sorted(p.name for p in written) == [
        "channel.png",
        "spatial_grid.png",
        "spatial_layer1.0.png",
        "spatial_layer2.0.png",
    ]
    with Image.open(tmp_path / "x" / "spatial_grid.png") as grid:
        assert grid.size == (2 * 160, 160 + 14)
    with Image.open(tmp_path / "x" / "spatial_layer1.0.png") as overlay:
        assert overlay.size == (40 * 9, 30 * 9)  # enlarged by a whole factor until the short side >= 256
    chart = channel_chart({k: v["channel"] for k, v in prediction.attention.items()})
    assert chart.height == 2 * (64 + 14 + 4)


def test_no_maps_no_pictures(tmp_path):
    prediction = Prediction(request_id="0", labels=[LabelScore(1, "one", 0.9)])
    assert save_attention_pictures(prediction, Image.new("RGB", (8, 8)), tmp_path) == []
