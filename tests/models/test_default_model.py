import json

import pytest
import torch
from PIL import Image

from models import DEFAULT_CHECKPOINT, SAMPLES_DIR, load_checkpoint

pytest.importorskip("sklearn", reason="the digits data set comes with scikit-learn (the train extra)")

from models.train import SEED, _digits_split, _to_unit_rgb, digit_image, evaluate, preprocess  # noqa: E402


@pytest.fixture(scope="module")
def default_model():
    return load_checkpoint(DEFAULT_CHECKPOINT)


def test_default_checkpoint_is_small_and_labelled(default_model):
    model, meta = default_model
    assert DEFAULT_CHECKPOINT.stat().st_size < 1_000_000
    assert meta.labels == [str(d) for d in range(10)]
    assert meta.version.startswith("digits-")
    assert meta.input_size == model.input_size == (32, 32)
    assert not model.training


def test_held_out_accuracy_is_at_least_97_percent():
    result = evaluate(DEFAULT_CHECKPOINT)
    assert result["total"] == 360
    assert result["accuracy"] >= 0.97, result


def _samples() -> dict[str, str]:
    labels = json.loads((SAMPLES_DIR / "labels.json").read_text())
    assert sorted(labels) == sorted(p.name for p in SAMPLES_DIR.glob("*.png"))
    assert 10 <= len(labels) <= 20 and set(labels.values()) == {str(d) for d in range(10)}
    return labels


def test_samples_are_held_out_and_reproduce_what_evaluation_saw(default_model):
    from sklearn.datasets import load_digits

    _, meta = default_model
    digits = load_digits()
    _, held_out = _digits_split(SEED, meta.input_size)
    for name, label in _samples().items():
        index = int(name.removesuffix(".png").split("_")[1])
        assert name.startswith(f"digit{label}_") and str(digits.target[index]) == label
        assert index in held_out.indices
        image = Image.open(SAMPLES_DIR / name)
        assert (image.mode, image.size) == ("L", (32, 32))
        # decode -> RGB -> bilinear resize -> / 255, as the server does, gives evaluation's exact input
        seen_in_evaluation = _to_unit_rgb(digit_image(digits.images[index]), meta.input_size)
        assert torch.equal(_to_unit_rgb(image, meta.input_size), seen_in_evaluation)


def test_the_default_model_classifies_every_sample(default_model):
    model, meta = default_model
    labels = _samples()
    batch = torch.stack([preprocess(Image.open(SAMPLES_DIR / name), meta) for name in labels])
    with torch.no_grad():
        predicted = [meta.labels[i] for i in model(batch).argmax(dim=1).tolist()]
    assert predicted == list(labels.values())
