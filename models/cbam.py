"""CBAM: Convolutional Block Attention Module (Woo et al., ECCV 2018, arXiv 1807.06521).

The defaults follow the authors' implementation (``Jongchan/attention-module``), not the widely copied
blog version, so that their released checkpoints load:

- the channel MLP is two ``Linear`` layers *with* biases, and its hidden size follows ``reduction``;
- the spatial branch is a bias-free conv followed by BatchNorm (eps 1e-5, momentum 0.01);
- the spatial branch pools along channels as ``cat((max, mean))``, max first.

Each module has ``attention(x)``, which returns the attention map alone, and ``forward(x)``, which
applies it. ``CBAM.forward_with_maps(x)`` returns the maps it applied, at no extra cost.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

__all__ = ["AttentionMaps", "ChannelAttention", "SpatialAttention", "CBAM", "CBAM_GATES"]

# The gates a CBAM may use: both (the paper), or one of them for ablations.
CBAM_GATES = ("channel_spatial", "channel", "spatial")


class AttentionMaps(NamedTuple):
    """The attention one CBAM applied: ``channel`` is B x C, ``spatial`` B x H x W, after the sigmoid."""

    channel: Tensor | None
    spatial: Tensor | None


class ChannelAttention(nn.Module):
    """Mc(F) = sigmoid(MLP(AvgPool(F)) + MLP(MaxPool(F))), one MLP shared by both descriptors.

    The MLP is C -> hidden -> C with a ReLU, where hidden = max(C // reduction, min(min_hidden, C)).
    ``min_hidden`` keeps narrow layers (C=16 with r=16 would leave one unit) from collapsing; it never
    binds in the ImageNet networks, whose narrowest CBAM has C=64, hidden=4 at r=16.
    """

    def __init__(self, channels: int, reduction: int = 16, *, min_hidden: int = 4, bias: bool = True) -> None:
        super().__init__()
        if channels < 1:
            raise ValueError(f"channels should be >= 1, got {channels}")
        if reduction < 1:
            raise ValueError(f"reduction should be >= 1, got {reduction}")
        if min_hidden < 1:
            raise ValueError(f"min_hidden should be >= 1, got {min_hidden}")
        hidden = max(channels // reduction, min(min_hidden, channels))
        self.fc1 = nn.Linear(channels, hidden, bias=bias)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Linear(hidden, channels, bias=bias)

    def attention(self, x: Tensor) -> Tensor:
        """B x C x H x W -> B x C attention after the sigmoid."""
        # Both descriptors go through the MLP as one 2 x B x C batch: one matmul per layer, not two.
        pooled = torch.stack((x.mean(dim=(2, 3)), x.amax(dim=(2, 3))))
        return torch.sigmoid(self.fc2(self.relu(self.fc1(pooled))).sum(dim=0))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)[:, :, None, None]


class SpatialAttention(nn.Module):
    """Ms(F) = sigmoid(BN(conv_kxk([MaxPool_c(F); AvgPool_c(F)]))), pooled along the channel axis.

    ``norm=False`` drops the BatchNorm (the paper's equations have none; the authors' code has it).
    """

    KERNEL_SIZES = (3, 7)

    def __init__(self, kernel_size: int = 7, *, norm: bool = True) -> None:
        super().__init__()
        if kernel_size not in self.KERNEL_SIZES:
            raise ValueError(f"kernel_size should be one of {self.KERNEL_SIZES}, got {kernel_size!r}")
        self.conv = nn.Conv2d(2, 1, kernel_size, padding=kernel_size // 2, bias=not norm)
        # eps and momentum as in the authors' BasicConv, so their running statistics mean the same.
        self.bn = nn.BatchNorm2d(1, eps=1e-5, momentum=0.01) if norm else None

    def attention(self, x: Tensor) -> Tensor:
        """B x C x H x W -> B x 1 x H x W attention after the sigmoid."""
        # Max first, then mean: the order the authors' checkpoints were trained with.
        pooled = torch.cat((x.amax(dim=1, keepdim=True), x.mean(dim=1, keepdim=True)), dim=1)
        out = self.conv(pooled)
        if self.bn is not None:
            out = self.bn(out)
        return torch.sigmoid(out)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.attention(x)


class CBAM(nn.Module):
    """Channel attention, then spatial attention, each multiplied in (the paper's best order).

    ``gates`` is ``"channel_spatial"`` (default), or ``"channel"`` / ``"spatial"`` for ablations.
    The defaults reproduce the authors' module: biased MLP with r=16, 7x7 conv + BatchNorm.
    ``inplace=True`` lets it overwrite its input when autograd is off (as the residual blocks do: on
    CPU a fresh activation-sized buffer costs page faults that cost more than the multiply).

    ``forward(x, shortcut)`` returns ``shortcut + CBAM(x)``, the last multiply and the residual addition
    in one pass (``torch.addcmul``): residual blocks hand it their shortcut (``fuses_shortcut``).
    """

    # Residual blocks pass their shortcut to attention modules that say they add it themselves.
    fuses_shortcut = True

    def __init__(
        self,
        channels: int,
        reduction: int = 16,
        spatial_kernel_size: int = 7,
        *,
        gates: str = "channel_spatial",
        min_hidden: int = 4,
        mlp_bias: bool = True,
        spatial_norm: bool = True,
        inplace: bool = False,
    ) -> None:
        super().__init__()
        if gates not in CBAM_GATES:
            raise ValueError(f"gates should be one of {CBAM_GATES}, got {gates!r}")
        self.channel = (
            ChannelAttention(channels, reduction, min_hidden=min_hidden, bias=mlp_bias)
            if gates != "spatial"
            else None
        )
        self.spatial = (
            SpatialAttention(spatial_kernel_size, norm=spatial_norm) if gates != "channel" else None
        )
        self.inplace = inplace

    def forward_with_maps(self, x: Tensor, shortcut: Tensor | None = None) -> tuple[Tensor, AttentionMaps]:
        """Apply CBAM (and add ``shortcut`` if given); return the output and the maps applied (spatial
        as B x H x W)."""
        # With autograd on, the pooled inputs are saved for backward and must not be overwritten.
        inplace = self.inplace and not torch.is_grad_enabled()
        channel = spatial = None
        if self.channel is not None:
            channel = self.channel.attention(x)
            # The shortcut is added with the last gate: this one when there is no spatial gate.
            x = _gate(x, channel[:, :, None, None], shortcut if self.spatial is None else None, inplace)
        if self.spatial is not None:
            spatial = self.spatial.attention(x)
            x = _gate(x, spatial, shortcut, inplace)
            spatial = spatial.squeeze(1)
        return x, AttentionMaps(channel, spatial)

    def forward(self, x: Tensor, shortcut: Tensor | None = None) -> Tensor:
        return self.forward_with_maps(x, shortcut)[0]


def _gate(x: Tensor, gate: Tensor, shortcut: Tensor | None, inplace: bool) -> Tensor:
    """``x * gate``, plus ``shortcut`` when given (in one pass), into ``x`` when ``inplace``."""
    if shortcut is not None:
        return _add_product(shortcut, x, gate, inplace)
    return x.mul_(gate) if inplace else x * gate


def _add_product(shortcut: Tensor, x: Tensor, gate: Tensor, inplace: bool) -> Tensor:
    """``shortcut + x * gate`` in one pass, into ``x`` when ``inplace``."""
    # Dynamo (torch.compile, torch.export, the ONNX exporter) refuses a channels-last ``out=``; the
    # compilers fuse the out-of-place op themselves, and both give the same numbers.
    if inplace and not torch.compiler.is_compiling():
        return torch.addcmul(shortcut, x, gate, out=x)
    return torch.addcmul(shortcut, x, gate)
