"""The CBAM authors' checkpoints, recreated: their state_dict layout (from the manifest) and their
ImageNet ResNet-18 + CBAM, written as in their ``MODELS/cbam.py`` and
``MODELS/model_resnet.py`` (Jongchan/attention-module), with their module names, so that an
official state_dict loads into it directly. Used only to check our conversion and our forward."""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# A copy of shared/reference/official_state_dict_manifest.json: the authors' keys, shapes and dtypes.
MANIFEST = Path(__file__).with_name("official_state_dict_manifest.json")


def official_manifest(arch: str) -> list[dict]:
    """The authors' state_dict keys, shapes and dtypes for ``arch`` (cbam_resnet18 or cbam_resnet50)."""
    return json.loads(MANIFEST.read_text())[arch]


def random_official_state_dict(arch: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors of the manifest's shapes, scaled so activations stay finite through the net."""
    gen = torch.Generator().manual_seed(seed)
    state_dict = {}
    for entry in official_manifest(arch):
        key, shape = entry["key"], entry["shape"]
        if entry["dtype"] == "int64":
            value = torch.randint(0, 1000, shape, generator=gen)
        elif key.endswith("running_var"):
            value = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(".weight") and len(shape) > 1:
            value = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
        else:
            value = torch.randn(shape, generator=gen) * 0.1
        state_dict[key] = value
    return state_dict


def save_official(state_dict: dict[str, torch.Tensor], path: Path, **kwargs) -> Path:
    """Save as the authors' released files are: DataParallel prefix, epoch, best_prec1, optimizer."""
    wrapped = {
        "epoch": 90,
        "arch": "resnet",
        "state_dict": {"module." + k: v for k, v in state_dict.items()},
        "best_prec1": 70.73,
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.001, "momentum": 0.9, "params": [0, 1]}]},
    }
    torch.save(wrapped, path, **kwargs)
    return path


class BasicConv(nn.Module):
    def __init__(self, in_planes, out_planes, kernel_size, padding):
        super().__init__()
        self.conv = nn.Conv2d(in_planes, out_planes, kernel_size, stride=1, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_planes, eps=1e-5, momentum=0.01, affine=True)

    def forward(self, x):
        return self.bn(self.conv(x))


class Flatten(nn.Module):
    def forward(self, x):
        return x.view(x.size(0), -1)


class ChannelGate(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16):
        super().__init__()
        self.mlp = nn.Sequential(
            Flatten(),
            nn.Linear(gate_channels, gate_channels // reduction_ratio),
            nn.ReLU(),
            nn.Linear(gate_channels // reduction_ratio, gate_channels),
        )

    def forward(self, x):
        avg_pool = F.avg_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
        max_pool = F.max_pool2d(x, (x.size(2), x.size(3)), stride=(x.size(2), x.size(3)))
        channel_att_sum = self.mlp(avg_pool) + self.mlp(max_pool)
        scale = torch.sigmoid(channel_att_sum).unsqueeze(2).unsqueeze(3).expand_as(x)
        return x * scale


class ChannelPool(nn.Module):
    def forward(self, x):
        return torch.cat((torch.max(x, 1)[0].unsqueeze(1), torch.mean(x, 1).unsqueeze(1)), dim=1)


class SpatialGate(nn.Module):
    def __init__(self):
        super().__init__()
        kernel_size = 7
        self.compress = ChannelPool()
        self.spatial = BasicConv(2, 1, kernel_size, padding=(kernel_size - 1) // 2)

    def forward(self, x):
        return x * torch.sigmoid(self.spatial(self.compress(x)))


class CBAM(nn.Module):
    def __init__(self, gate_channels, reduction_ratio=16):
        super().__init__()
        self.ChannelGate = ChannelGate(gate_channels, reduction_ratio)
        self.SpatialGate = SpatialGate()

    def forward(self, x):
        return self.SpatialGate(self.ChannelGate(x))


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.cbam = CBAM(planes, 16)

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            residual = self.downsample(x)
        out = self.cbam(out)
        out += residual
        return self.relu(out)


class ResNet18CBAM(nn.Module):
    def __init__(self, num_classes=1000):
        super().__init__()
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.avgpool = nn.AvgPool2d(7)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = self._make_layer(64, 2)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.fc = nn.Linear(512, num_classes)

    def _make_layer(self, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(self.inplanes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.avgpool(x)
        return self.fc(x.view(x.size(0), -1))
