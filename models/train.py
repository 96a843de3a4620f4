"""Train and evaluate the embedded default model: CBAM-ResNet-8 on scikit-learn's handwritten digits.

``load_digits`` ships with scikit-learn (1,797 8x8 images, values 0..16, 10 classes), so nothing is
downloaded. Every image goes through the pipeline the server applies to any image it receives:
8-bit grey (v * 255 / 16, rounded) -> RGB -> Pillow bilinear resize to the input size -> / 255 ->
(x - mean) / std. The held-out split is stratified and fixed by the seed.

scikit-learn (the ``train`` extra) is imported only here, and only when called.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ._default import DEFAULT_CHECKPOINT, SAMPLES_DIR
from .checkpoint import CheckpointMetadata, load_checkpoint, save_checkpoint
from .registry import create_model, default_input_size

__all__ = ["TrainConfig", "train_default", "evaluate", "digit_image", "preprocess"]

ARCH = "cbam_resnet8_cifar"
LABELS = [str(digit) for digit in range(10)]
SEED = 0
TEST_FRACTION = 0.2
VERSION = "digits-1"
SAMPLES_PER_CLASS = 2


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides the trained weights; the defaults made the committed model."""

    seed: int = SEED
    epochs: int = 40
    batch_size: int = 64
    lr: float = 0.05
    weight_decay: float = 5e-4
    max_rotation_deg: float = 10.0
    max_shift_px: float = 2.0
    version: str = VERSION


def digit_image(pixels: np.ndarray) -> Image.Image:
    """One 8x8 digit (values 0..16) as an 8-bit grey image: v * 255 / 16, rounded."""
    return Image.fromarray(np.rint(np.asarray(pixels, dtype=np.float64) * 255 / 16).astype(np.uint8), "L")


def _to_unit_rgb(image: Image.Image, input_size: tuple[int, int]) -> Tensor:
    """RGB, Pillow bilinear resize to (H, W), scaled to 0..1: a 3 x H x W float tensor."""
    height, width = input_size
    resized = image.convert("RGB").resize((width, height), Image.BILINEAR)
    return torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0).permute(2, 0, 1)


def preprocess(image: Image.Image, meta: CheckpointMetadata) -> Tensor:
    """The server's preprocessing of one decoded image: 3 x H x W, normalised with ``meta``."""
    return _normalise(_to_unit_rgb(image, meta.input_size), meta.mean, meta.std)


def _normalise(x: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    shape = (3, 1, 1) if x.ndim == 3 else (1, 3, 1, 1)
    return (x - torch.tensor(mean).view(shape)) / torch.tensor(std).view(shape)


@dataclass(frozen=True)
class _Split:
    images: Tensor  # N x 3 x H x W in 0..1, before normalisation
    labels: Tensor  # N, int64
    indices: np.ndarray  # positions in load_digits()


def _digits_split(seed: int, input_size: tuple[int, int]) -> tuple[_Split, _Split]:
    """(train, held-out), stratified by class and fixed by ``seed``."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    everything = np.arange(len(digits.target))
    train_idx, test_idx = train_test_split(
        everything, test_size=TEST_FRACTION, random_state=seed, stratify=digits.target
    )

    def split(indices: np.ndarray) -> _Split:
        images = torch.stack([_to_unit_rgb(digit_image(digits.images[i]), input_size) for i in indices])
        return _Split(images, torch.as_tensor(digits.target[indices], dtype=torch.int64), indices)

    return split(train_idx), split(test_idx)


def _augment(x: Tensor, config: TrainConfig, generator: torch.Generator) -> Tensor:
    """Small random rotations and shifts of a 0..1 batch; the black border is the digits' background."""
    n, _, height, width = x.shape
    angle = (torch.rand(n, generator=generator) * 2 - 1) * np.deg2rad(config.max_rotation_deg)
    shift = (torch.rand(n, 2, generator=generator) * 2 - 1) * config.max_shift_px
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[:, 0] * 2 / width], dim=1),
            torch.stack([sin, cos, shift[:, 1] * 2 / height], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def train_default(
    checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT,
    samples_dir: str | os.PathLike | None = SAMPLES_DIR,
    config: TrainConfig = TrainConfig(),
    progress: bool = True,
) -> dict:
    """Train the default model, save it to ``checkpoint`` and held-out samples to ``samples_dir``.

    Returns the held-out evaluation (see ``evaluate``).
    """
    from tqdm import tqdm

    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    input_size = default_input_size(ARCH)
    train, _ = _digits_split(config.seed, input_size)
    # Grey images: one mean and std, from the training split only, used for all three channels.
    mean = (round(train.images.mean().item(), 4),) * 3
    std = (round(train.images.std().item(), 4),) * 3
    meta = CheckpointMetadata(ARCH, len(LABELS), LABELS, input_size, mean, std, config.version)

    model = create_model(ARCH, num_classes=len(LABELS))
    steps_per_epoch = -(-len(train.labels) // config.batch_size)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=config.lr, momentum=0.9, nesterov=True, weight_decay=config.weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=config.lr, epochs=config.epochs, steps_per_epoch=steps_per_epoch
    )
    model.train()
    bar = tqdm(range(config.epochs), desc="train-default", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(train.labels), generator=generator)
        total_loss = 0.0
        for start in range(0, len(order), config.batch_size):
            batch = order[start : start + config.batch_size]
            x = _normalise(_augment(train.images[batch], config, generator), mean, std)
            loss = F.cross_entropy(model(x), train.labels[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            total_loss += loss.item() * len(batch)
        bar.set_postfix(loss=f"{total_loss / len(order):.4f}")

    model.eval()
    checkpoint = Path(checkpoint)
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint(model, checkpoint, meta)
    if samples_dir is not None:
        write_samples(Path(samples_dir), seed=config.seed)
    return evaluate(checkpoint, seed=config.seed)


def write_samples(samples_dir: Path, seed: int = SEED, per_class: int = SAMPLES_PER_CLASS) -> list[Path]:
    """Save the first ``per_class`` held-out images of each digit as PNG, plus ``labels.json``.

    Each PNG is the 8-bit grey digit after the bilinear upscale to the model's input size, so the
    server's resize is the identity and it sees exactly what ``evaluate`` does.
    """
    from sklearn.datasets import load_digits

    input_size = default_input_size(ARCH)
    _, held_out = _digits_split(seed, input_size)
    digits = load_digits()
    samples_dir.mkdir(parents=True, exist_ok=True)
    for old in samples_dir.glob("*.png"):
        old.unlink()
    labels, written = {}, []
    for digit in range(len(LABELS)):
        for index in [i for i in held_out.indices if digits.target[i] == digit][:per_class]:
            name = f"digit{digit}_{index:04d}.png"
            height, width = input_size
            digit_image(digits.images[index]).resize((width, height), Image.BILINEAR).save(samples_dir / name)
            labels[name] = LABELS[digit]
            written.append(samples_dir / name)
    (samples_dir / "labels.json").write_text(json.dumps(dict(sorted(labels.items())), indent=2) + "\n")
    return written


@torch.no_grad()
def evaluate(checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT, seed: int = SEED) -> dict:
    """Accuracy of a digits checkpoint on the held-out split fixed by ``seed``.

    Returns ``{"checkpoint", "arch", "version", "seed", "total", "correct", "accuracy",
    "per_class_accuracy"}``.
    """
    model, meta = load_checkpoint(checkpoint)
    _, held_out = _digits_split(seed, meta.input_size)
    logits = _predict(model, _normalise(held_out.images, meta.mean, meta.std))
    # Predictions index the checkpoint's labels; compare by name, so a reordered label list still counts.
    predicted = [meta.labels[i] for i in logits.argmax(dim=1).tolist()]
    truth = [LABELS[i] for i in held_out.labels.tolist()]
    hits = [p == t for p, t in zip(predicted, truth, strict=True)]
    per_class = {
        label: float(np.mean([h for h, t in zip(hits, truth, strict=True) if t == label])) for label in LABELS
    }
    return {
        "checkpoint": str(checkpoint),
        "arch": meta.arch,
        "version": meta.version,
        "seed": seed,
        "total": len(hits),
        "correct": int(sum(hits)),
        "accuracy": sum(hits) / len(hits),
        "per_class_accuracy": per_class,
    }


def _predict(model: nn.Module, x: Tensor, batch_size: int = 256) -> Tensor:
    return torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
