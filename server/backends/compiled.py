"""``compile``: ``torch.compile`` (Inductor) with frozen weights, one graph per batch bucket."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from models.cbam import AttentionMaps
from server.backends.base import BackendTarget, ModelBackend

__all__ = ["CompiledBackend"]

_log = logging.getLogger(__name__)


class CompiledBackend(ModelBackend):
    """``torch.compile`` with frozen weights: BatchNorm folded into the convolutions, weights prepacked,
    CBAM's pooling, gating and residual fused. One graph per batch shape; on CUDA
    ``mode="reduce-overhead"`` also captures each shape as a CUDA graph, and batches are padded up to
    their bucket (one launch); on the CPU, where padding is paid in full compute (a batch of 17 padded
    to 32 halved cbam_resnet50's throughput), they run as bucket-sized pieces.

    Batches that asked for maps run the eager module: a second graph per bucket would double a start
    that already takes minutes for a ResNet-50, for the rarer kind of request.

    Inductor's own cache keeps the compiled kernels in ``<model.cache_dir>/inductor``. With freezing
    its FX graph cache is bypassed on the CPU ("mkldnn tensors unpickleable", torch 2.13), so a warm
    start still traces and lowers every graph, but compiles no C++: docs/PERFORMANCE.md has the times.
    """

    def __init__(self, model: nn.Module, target: BackendTarget) -> None:
        from torch._inductor import config as inductor_config

        super().__init__(model, target)
        folder = target.cache.folder("inductor")
        if folder is not None:
            # Inductor reads its cache directory from this variable only (its documented knob), at
            # every compilation; the process compiles nothing before this backend exists.
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
            _log.info("inductor cache", extra={"fields": {"backend": "compile", "path": str(folder)}})
        cuda = target.device.type == "cuda"
        self.batch_shapes = "pad" if cuda else "split"
        mode = "reduce-overhead" if cuda else None
        self._plain = torch.compile(model, dynamic=False, fullgraph=True, mode=mode)
        # Freezing makes the weights constants of the graph (folded, prepacked): 1.5x on this CPU. It is
        # read when a shape compiles, on its first call, and torch.compile(options=...) does not turn it
        # on (measured), so every call runs under the patch. The served weights never change.
        self._freezing = inductor_config.patch(freezing=True)

    def run(self, x: Tensor, blocks: Sequence[str] | None) -> tuple[Tensor, dict[str, AttentionMaps]]:
        if blocks is None:
            with self._freezing:
                return self._plain(x), {}
        return self.model.forward_with_attention(x, blocks=list(blocks))
