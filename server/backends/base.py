"""What every backend is: ``ModelBackend``, built for a ``BackendTarget``."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from models.cbam import AttentionMaps
from server.backends.cache import ArtefactCache

__all__ = ["BackendTarget", "BatchShapes", "ModelBackend"]

# How batch sizes reach ``run``: as they come; padded up to the next bucket (one graph per bucket);
# or as bucket-sized pieces (17 = 16 + 1), where padding would be paid in full compute.
BatchShapes = Literal["any", "pad", "split"]


@dataclass(frozen=True)
class BackendTarget:
    """Where and how a backend runs the model."""

    device: torch.device
    dtype: torch.dtype
    input_size: tuple[int, int]  # (H, W)
    threads: int = 1  # intra-op threads, for runtimes that keep their own pool
    cache: ArtefactCache = field(default_factory=ArtefactCache)  # off unless given a directory


class ModelBackend:
    """One way to run batches of one module. Subclasses build in ``__init__(model, target)`` and say
    in ``missing`` why they cannot run somewhere, before anything is built."""

    batch_shapes: BatchShapes = "any"

    def __init__(self, model: nn.Module, target: BackendTarget | None = None) -> None:
        self.model = model

    @classmethod
    def missing(cls, target: BackendTarget) -> str | None:
        """Why this backend cannot run on ``target`` (a package not installed, a dtype), or None."""
        return None

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        """Logits (B x classes) and, when ``blocks`` is not None, those blocks' maps in network order."""
        raise NotImplementedError
