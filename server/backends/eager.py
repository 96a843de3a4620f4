"""``eager``: the PyTorch module as it is."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from models.cbam import AttentionMaps
from server.backends.base import ModelBackend

__all__ = ["EagerBackend"]


class EagerBackend(ModelBackend):
    """Calls the module itself: its ``forward``, or ``forward_with_attention`` for the blocks asked for."""

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        if blocks is None:
            return self.model(x), {}
        return self.model.forward_with_attention(x, blocks=list(blocks))
