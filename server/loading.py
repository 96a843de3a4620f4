"""What ``model.*`` names, made real: the device, the dtype, and the module with its metadata.

Each raises StartupError naming the field when a setting cannot be honoured on this machine.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from server.config import ModelSettings
from server.errors import StartupError

if TYPE_CHECKING:
    from models import CheckpointMetadata

__all__ = ["load_model", "resolve_device", "resolve_dtype"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(name: str) -> torch.device:
    """``auto`` is CUDA when present, else CPU; an explicit accelerator must exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise StartupError("model.device", f"{name!r} asked for, but CUDA is not available here")
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise StartupError(
                "model.device", f"{name!r}: only {torch.cuda.device_count()} CUDA devices here"
            )
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise StartupError("model.device", "'mps' asked for, but MPS is not available here")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The torch dtype ``name``; float16 only on CUDA."""
    dtype = _DTYPES[name]
    if dtype is torch.float16 and device.type != "cuda":
        raise StartupError("model.dtype", f"float16 needs a CUDA device, but model.device is {device}; "
                           "use float32 or bfloat16")  # fmt: skip
    return dtype


def load_model(settings: ModelSettings) -> tuple[nn.Module, CheckpointMetadata]:
    """The checkpoint (or ``arch`` with seeded random weights), on the CPU in eval mode, and its metadata."""
    import models  # torch-only; imported here so the rest of the server loads without it

    if settings.arch is not None:
        if settings.arch not in models.list_models():
            raise StartupError("model.arch", f"unknown architecture {settings.arch!r}; "
                               f"choose one of {models.list_models()}")  # fmt: skip
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model: nn.Module = models.create_model(settings.arch, num_classes=settings.num_classes)
        meta = models.CheckpointMetadata(  # ImageNet normalisation, the metadata's default
            arch=settings.arch,
            num_classes=settings.num_classes,
            labels=[f"class_{i}" for i in range(settings.num_classes)],
            input_size=model.input_size,
            version=f"random-seed{settings.seed}",
        )
        return model.eval(), meta
    path = Path(settings.checkpoint) if settings.checkpoint is not None else models.DEFAULT_CHECKPOINT
    try:
        return models.load_checkpoint(path, map_location="cpu")
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        raise StartupError("model.checkpoint", str(exc)) from None
