"""ResNets with a CBAM in every residual block (Woo et al. 2018, Fig. 3), and plain ResNets to compare.

Layout and names follow torchvision's ``resnet.py`` (``conv1``, ``bn1``, ``layer1.0.conv1``, ...,
``fc``). Bottleneck blocks put the stride on the 3x3 conv (torchvision's layout, "ResNet v1.5"); the
original ResNet, and the paper's GFLOPs, put it on the first 1x1 conv. Parameter counts are the same
either way; multiply-adds at 224x224 are 4.096 G for CBAM-ResNet-50 here against the paper's 3.864 G.

Each block has one attention slot, applied to the residual branch after its last BatchNorm and before
the addition with the shortcut. ``CBAMResNet.forward_with_attention`` returns the maps of every CBAM it
is asked for along with the logits; ``forward`` never does attention bookkeeping.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial

import torch
from torch import Tensor, nn

from .cbam import CBAM, AttentionMaps
from .registry import register_model

__all__ = [
    "CBAMResNet",
    "BasicBlock",
    "Bottleneck",
    "cbam_resnet18",
    "cbam_resnet34",
    "cbam_resnet50",
    "cbam_resnet101",
    "cbam_resnet152",
    "resnet18",
    "resnet34",
    "resnet50",
    "resnet101",
    "resnet152",
    "cbam_resnet8_cifar",
    "cbam_resnet20_cifar",
]

AttentionFactory = Callable[[int], nn.Module]


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class _Block(nn.Module):
    """What both blocks share: residual branch -> attention -> + shortcut -> ReLU."""

    expansion = 1
    attention: nn.Module | None
    downsample: nn.Module | None
    relu: nn.ReLU

    def _residual(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def forward(self, x: Tensor) -> Tensor:
        out = self._residual(x)
        if self.attention is None:
            out += self._shortcut(x)
        elif getattr(self.attention, "fuses_shortcut", False):
            # CBAM adds the shortcut in the pass that applies its last map: one pass over the
            # activation fewer per block.
            out = self.attention(out, self._shortcut(x))
        else:
            out = self.attention(out)
            out += self._shortcut(x)
        return self.relu(out)

    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, AttentionMaps]:
        """Like ``forward``, also returning the maps the block's CBAM applied."""
        if not hasattr(self.attention, "forward_with_maps"):
            raise TypeError(f"this block's attention ({type(self.attention).__name__}) returns no maps")
        if getattr(self.attention, "fuses_shortcut", False):
            out, maps = self.attention.forward_with_maps(self._residual(x), self._shortcut(x))
        else:
            out, maps = self.attention.forward_with_maps(self._residual(x))
            out += self._shortcut(x)
        return self.relu(out), maps


class BasicBlock(_Block):
    """Two 3x3 convs (ResNet-18/34)."""

    expansion = 1

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.attention = attention(planes) if attention is not None else None

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        return self.bn2(self.conv2(out))


class Bottleneck(_Block):
    """1x1 -> 3x3 -> 1x1 convs (ResNet-50/101/152), stride on the 3x3 conv as in torchvision."""

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        attention: AttentionFactory | None = None,
    ) -> None:
        super().__init__()
        width = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, width)
        self.bn3 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.attention = attention(width) if attention is not None else None

    def _residual(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        return self.bn3(self.conv3(out))


_STEMS = ("imagenet", "cifar")


class CBAMResNet(nn.Module):
    """A ResNet whose blocks carry ``attention(channels)`` (CBAM; ``None`` gives a plain ResNet).

    ``stem="imagenet"``: 7x7 stride-2 conv and 3x3 max-pool, for 224x224 inputs.
    ``stem="cifar"``: one 3x3 stride-1 conv, for small (32x32) inputs.
    ``widths`` gives each stage's base width; stage ``i`` has ``layers[i]`` blocks and all but the
    first halve the resolution. The global average pool lets any input size through.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        attention: AttentionFactory | None = None,
        zero_init_residual: bool = False,
        input_size: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if stem not in _STEMS:
            raise ValueError(f"stem should be one of {_STEMS}, got {stem!r}")
        if len(layers) != len(widths) or not layers:
            raise ValueError(
                f"layers and widths should have one entry per stage, got {layers!r} and {widths!r}"
            )
        if num_classes < 1:
            raise ValueError(f"num_classes should be >= 1, got {num_classes}")
        if input_size is None:
            input_size = (224, 224) if stem == "imagenet" else (32, 32)
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.num_classes = num_classes

        self.inplanes = widths[0]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, self.inplanes, kernel_size=7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        else:
            self.conv1 = conv3x3(3, self.inplanes)
            self.maxpool = nn.Identity()
        self.bn1 = nn.BatchNorm2d(self.inplanes)
        self.relu = nn.ReLU(inplace=True)

        self._stage_names = tuple(f"layer{i + 1}" for i in range(len(layers)))
        for i, (name, width, depth) in enumerate(zip(self._stage_names, widths, layers, strict=True)):
            stage = self._make_layer(block, width, depth, stride=1 if i == 0 else 2, attention=attention)
            self.add_module(name, stage)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(widths[-1] * block.expansion, num_classes)

        # Blocks whose attention can report its maps (CBAM, or any module with forward_with_maps).
        self._attention_blocks = tuple(
            n for n, blk in self._named_blocks() if hasattr(blk.attention, "forward_with_maps")
        )
        self._init_weights(zero_init_residual)

    def _make_layer(
        self,
        block: type[BasicBlock | Bottleneck],
        planes: int,
        blocks: int,
        stride: int,
        attention: AttentionFactory | None,
    ) -> nn.Sequential:
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                nn.BatchNorm2d(planes * block.expansion),
            )
        stage = [block(self.inplanes, planes, stride, downsample, attention)]
        self.inplanes = planes * block.expansion
        stage += [block(self.inplanes, planes, attention=attention) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            # As in the authors' code: the spatial gate's BN starts at 0, so Ms starts at 0.5 everywhere.
            if isinstance(m, CBAM) and m.spatial is not None and m.spatial.bn is not None:
                nn.init.zeros_(m.spatial.bn.weight)
            # Each residual branch starts at zero, so each block starts as the identity; this improves
            # the model by 0.2~0.3% (Goyal et al., https://arxiv.org/abs/1706.02677).
            if zero_init_residual and isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif zero_init_residual and isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _named_blocks(self) -> Iterator[tuple[str, _Block]]:
        for stage_name in self._stage_names:
            for index, block in enumerate(getattr(self, stage_name)):
                yield f"{stage_name}.{index}", block

    @property
    def attention_blocks(self) -> list[str]:
        """Every block name with a CBAM (e.g. ``"layer1.0"``), in network order."""
        return list(self._attention_blocks)

    def _stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def _head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def forward(self, x: Tensor) -> Tensor:
        x = self._stem(x)
        for stage_name in self._stage_names:
            x = getattr(self, stage_name)(x)
        return self._head(x)

    def forward_with_attention(
        self, x: Tensor, blocks: Iterable[str] | None = None
    ) -> tuple[Tensor, dict[str, AttentionMaps]]:
        """Logits (identical to ``forward``) and the attention maps of ``blocks`` (None: every CBAM).

        Maps come in network order, keyed by block name; ``channel`` is B x C and ``spatial`` B x H x W.
        No hooks are involved: the chosen blocks return their maps, the others run as in ``forward``.
        """
        wanted = self._select_blocks(blocks)
        maps: dict[str, AttentionMaps] = {}
        x = self._stem(x)
        for name, block in self._named_blocks():
            if name in wanted:
                x, maps[name] = block.forward_with_attention(x)
            else:
                x = block(x)
        return self._head(x), maps

    def _select_blocks(self, blocks: Iterable[str] | None) -> frozenset[str]:
        if blocks is None:
            return frozenset(self._attention_blocks)
        wanted = frozenset([blocks] if isinstance(blocks, str) else blocks)
        unknown = sorted(wanted.difference(self._attention_blocks))
        if unknown:
            known = list(self._attention_blocks)
            raise ValueError(f"unknown attention blocks {unknown}; this model's CBAM blocks are {known}")
        return wanted


def _cbam(reduction: int, spatial_kernel_size: int, gates: str) -> AttentionFactory:
    # inplace: a block's residual branch output is its own to overwrite.
    return partial(
        CBAM, reduction=reduction, spatial_kernel_size=spatial_kernel_size, gates=gates, inplace=True
    )


def _cbam_resnet(
    block: type[BasicBlock | Bottleneck],
    layers: Sequence[int],
    *,
    reduction: int = 16,
    spatial_kernel_size: int = 7,
    gates: str = "channel_spatial",
    **kwargs,
) -> CBAMResNet:
    return CBAMResNet(block, layers, attention=_cbam(reduction, spatial_kernel_size, gates), **kwargs)


@register_model
def cbam_resnet18(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-18: BasicBlocks (2, 2, 2, 2), CBAM before every residual addition. 11,779,392 params."""
    return _cbam_resnet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def cbam_resnet34(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-34: BasicBlocks (3, 4, 6, 3), CBAM before every residual addition. 21,960,468 params."""
    return _cbam_resnet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def cbam_resnet50(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-50: Bottlenecks (3, 4, 6, 3), stride on the 3x3 conv (torchvision's layout),
    CBAM before every residual addition. 28,089,624 params."""
    return _cbam_resnet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def cbam_resnet101(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-101: Bottlenecks (3, 4, 23, 3), stride on the 3x3 conv (torchvision's layout),
    CBAM before every residual addition. 49,330,172 params."""
    return _cbam_resnet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def cbam_resnet152(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-152: Bottlenecks (3, 8, 36, 3), stride on the 3x3 conv (torchvision's layout),
    CBAM before every residual addition."""
    return _cbam_resnet(Bottleneck, (3, 8, 36, 3), **kwargs)


@register_model
def resnet18(**kwargs) -> CBAMResNet:
    """Plain ResNet-18 (no attention), for comparison. 11,689,512 params."""
    return CBAMResNet(BasicBlock, (2, 2, 2, 2), **kwargs)


@register_model
def resnet34(**kwargs) -> CBAMResNet:
    """Plain ResNet-34 (no attention), for comparison. 21,797,672 params."""
    return CBAMResNet(BasicBlock, (3, 4, 6, 3), **kwargs)


@register_model
def resnet50(**kwargs) -> CBAMResNet:
    """Plain ResNet-50, stride on the 3x3 conv (torchvision's layout), for comparison. 25,557,032 params."""
    return CBAMResNet(Bottleneck, (3, 4, 6, 3), **kwargs)


@register_model
def resnet101(**kwargs) -> CBAMResNet:
    """Plain ResNet-101, stride on the 3x3 conv (torchvision's layout), for comparison. 44,549,160 params."""
    return CBAMResNet(Bottleneck, (3, 4, 23, 3), **kwargs)


@register_model
def resnet152(**kwargs) -> CBAMResNet:
    """Plain ResNet-152, stride on the 3x3 conv (torchvision's layout), for comparison. 60,192,808 params."""
    return CBAMResNet(Bottleneck, (3, 8, 36, 3), **kwargs)


_CIFAR_WIDTHS = (16, 32, 64)


@register_model(input_size=(32, 32))
def cbam_resnet8_cifar(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-8 for 32x32 inputs: 3x3 stem, one BasicBlock per stage, widths 16/32/64.

    The embedded default model (handwritten digits) is this network.
    """
    return _cbam_resnet(BasicBlock, (1, 1, 1), **{"widths": _CIFAR_WIDTHS, "stem": "cifar", **kwargs})


@register_model(input_size=(32, 32))
def cbam_resnet20_cifar(**kwargs) -> CBAMResNet:
    """CBAM-ResNet-20 for 32x32 inputs (He et al.'s CIFAR layout): 3x3 stem, 3 BasicBlocks per stage,
    widths 16/32/64."""
    return _cbam_resnet(BasicBlock, (3, 3, 3), **{"widths": _CIFAR_WIDTHS, "stem": "cifar", **kwargs})
