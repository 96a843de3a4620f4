"""Checkpoints: our safetensors format, and conversion of the CBAM authors' released PyTorch files.

Our format is a safetensors file of the model's ``state_dict`` whose header metadata holds, under the
key ``cbam_serve``, a JSON object: ``{"format_version": 1, "arch": ..., "num_classes": ...,
"labels": [...], "input_size": [H, W], "mean": [3 floats], "std": [3 floats], "version": ...,
"model_kwargs": {...}}``. The model is rebuilt with ``create_model(arch, num_classes=...,
**model_kwargs)``, so nothing in the file is ever executed.

The authors' files (``Jongchan/attention-module``) are pickles: a dict with ``state_dict`` (keys
prefixed ``module.``), ``epoch``, ``best_prec1`` and ``optimizer``. They are only ever opened with
``torch.load(..., weights_only=True)``.

Errors, all raised while reading or writing a checkpoint::

    CheckpointError (ValueError)
    +-- CheckpointNotFoundError    no file at that path
    +-- NotACheckpointError        unreadable, not our format, or a pickle holding arbitrary objects
    +-- UnknownArchitectureError   the architecture is not registered
    +-- CheckpointKeysError        missing and/or unexpected keys, named
    +-- CheckpointShapeError       tensors whose shape differs from the model's, with both shapes
"""

from __future__ import annotations

import json
import os
import pickle
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .registry import create_model, default_input_size, list_models

__all__ = [
    "CheckpointMetadata",
    "CheckpointError",
    "CheckpointNotFoundError",
    "NotACheckpointError",
    "UnknownArchitectureError",
    "CheckpointKeysError",
    "CheckpointShapeError",
    "save_checkpoint",
    "load_checkpoint",
    "load_official_checkpoint",
    "convert_official_checkpoint",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
]

FORMAT_VERSION = 1
_METADATA_KEY = "cbam_serve"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Error messages name at most this many keys, then say how many more there are.
_MAX_NAMED = 20


class CheckpointError(ValueError):
    """A checkpoint could not be read, written or matched to its model."""


class CheckpointNotFoundError(CheckpointError):
    """No file at the given path."""


class NotACheckpointError(CheckpointError):
    """The file is not a checkpoint we can read, or holds objects we refuse to unpickle."""


class UnknownArchitectureError(CheckpointError):
    """The checkpoint names an architecture that is not registered."""


class CheckpointKeysError(CheckpointError):
    """The checkpoint's tensors and the model's differ by name."""

    def __init__(self, source: str, missing: Sequence[str], unexpected: Sequence[str]) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        parts = []
        if self.missing:
            parts.append(f"missing keys {_name_some(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected keys {_name_some(self.unexpected)}")
        super().__init__(f"{source} does not match the model: {'; '.join(parts)}")


class CheckpointShapeError(CheckpointError):
    """Some tensors have the right names but the wrong shapes."""

    def __init__(self, source: str, mismatched: Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]):
        self.mismatched = dict(mismatched)
        described = [f"{k}: checkpoint {list(a)} vs model {list(b)}" for k, (a, b) in self.mismatched.items()]
        super().__init__(f"{source} does not match the model: shape mismatch for {_name_some(described)}")


def _name_some(names: Sequence[str]) -> str:
    named = ", ".join(names[:_MAX_NAMED])
    more = len(names) - _MAX_NAMED
    return f"[{named}]" + (f" and {more} more" if more > 0 else "")


@dataclass
class CheckpointMetadata:
    """What a checkpoint says about its model and how to feed it.

    Inputs are RGB images resized to ``input_size`` (H, W) with Pillow's bilinear filter, scaled to
    0..1 and normalised per channel with ``mean`` and ``std``.
    """

    arch: str
    num_classes: int
    labels: list[str]
    input_size: tuple[int, int]
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    version: str = "unversioned"
    model_kwargs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.labels = [str(label) for label in self.labels]
        self.input_size = tuple(int(s) for s in self.input_size)
        self.mean = tuple(float(m) for m in self.mean)
        self.std = tuple(float(s) for s in self.std)
        self.model_kwargs = dict(self.model_kwargs)
        if self.num_classes < 1 or len(self.labels) != self.num_classes:
            raise ValueError(f"labels should name each of {self.num_classes} classes, got {len(self.labels)}")
        if len(self.input_size) != 2 or min(self.input_size) < 1:
            raise ValueError(f"input_size should be two positive ints (H, W), got {self.input_size!r}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std should be 3 floats, std > 0, got {self.mean!r} and {self.std!r}")
        if "num_classes" in self.model_kwargs:
            raise ValueError("model_kwargs should not hold num_classes; it is a field of its own")

    def to_json(self) -> str:
        return json.dumps({"format_version": FORMAT_VERSION, **asdict(self)})

    @classmethod
    def from_json(cls, text: str) -> CheckpointMetadata:
        """Parse metadata written by ``to_json``; raises ValueError naming what is wrong."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError(f"metadata should be a JSON object, got {type(data).__name__}")
        version = data.pop("format_version", None)
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version should be {FORMAT_VERSION}, got {version!r}")
        known = {f.name for f in fields(cls)}
        if unknown := sorted(set(data) - known):
            raise ValueError(f"unknown metadata fields {unknown}")
        if missing := sorted(f.name for f in fields(cls) if f.name not in data):
            raise ValueError(f"missing metadata fields {missing}")
        return cls(**data)


def _build(meta: CheckpointMetadata, source: str) -> nn.Module:
    """The model ``meta`` describes, on the meta device: shapes only, ready for ``_load_into``."""
    if meta.arch not in list_models():
        raise UnknownArchitectureError(
            f"{source} names architecture {meta.arch!r}, which is not registered; "
            f"choose one of {list_models()}"
        )
    try:
        with torch.device("meta"):
            return create_model(meta.arch, num_classes=meta.num_classes, **meta.model_kwargs)
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"{source}: cannot build {meta.arch!r} with {meta.model_kwargs}: {exc}"
        ) from exc


def _match_state_dict(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> dict[str, Tensor]:
    """Check names and shapes against ``model``; return the tensors in the model's dtypes."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing or unexpected:
        raise CheckpointKeysError(source, missing, unexpected)
    mismatched = {
        k: (tuple(tensors[k].shape), tuple(v.shape))
        for k, v in expected.items()
        if tensors[k].shape != v.shape
    }
    if mismatched:
        raise CheckpointShapeError(source, mismatched)
    return {k: tensors[k].to(dtype=v.dtype) for k, v in expected.items()}


def _load_into(model: nn.Module, tensors: Mapping[str, Tensor], source: str) -> nn.Module:
    # assign=True adopts the loaded tensors instead of copying them into freshly initialised ones.
    model.load_state_dict(_match_state_dict(model, tensors, source), assign=True)
    return model.eval()


def save_checkpoint(model: nn.Module, path: str | os.PathLike, meta: CheckpointMetadata) -> None:
    """Write ``model``'s weights and ``meta`` to ``path`` (safetensors; replaced atomically).

    The weights are checked against ``meta.arch`` first, so what is written will load.
    """
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model saves as the model it wraps
    path = Path(path)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    _match_state_dict(_build(meta, str(path)), tensors, f"model saved as {meta.arch!r}")
    # Written as bytes, not with save_file, so the file gets the usual (umask) permissions, not 0600.
    data = safetensors.torch.save(tensors, metadata={"format": "pt", _METADATA_KEY: meta.to_json()})
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    os.replace(partial, path)


def _looks_like_torch_pickle(path: Path) -> bool:
    with path.open("rb") as f:
        head = f.read(2)
    return head == b"PK" or head[:1] == b"\x80"  # zip archive (torch.save) or a raw pickle


def load_checkpoint(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, CheckpointMetadata]:
    """Load one of our checkpoints: returns (model in eval mode on ``map_location``, its metadata)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint file at {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    except (SafetensorError, OSError, ValueError) as exc:
        hint = (
            "; it looks like a PyTorch pickle: convert it with `cbam-models convert --arch NAME SRC DST`"
            if _looks_like_torch_pickle(path)
            else ""
        )
        raise NotACheckpointError(f"{path} is not a safetensors checkpoint ({exc}){hint}") from exc
    if _METADATA_KEY not in header:
        raise NotACheckpointError(f"{path} is a safetensors file without {_METADATA_KEY!r} metadata")
    try:
        meta = CheckpointMetadata.from_json(header[_METADATA_KEY])
    except (ValueError, TypeError) as exc:
        raise NotACheckpointError(f"{path} has invalid {_METADATA_KEY!r} metadata: {exc}") from exc
    model = _load_into(_build(meta, str(path)), tensors, str(path))
    return model.to(map_location), meta


# The authors' CBAM submodules and ours: everything else already has torchvision's (and our) names.
_OFFICIAL_TO_OURS = (
    (".cbam.ChannelGate.mlp.1.", ".attention.channel.fc1."),
    (".cbam.ChannelGate.mlp.3.", ".attention.channel.fc2."),
    (".cbam.SpatialGate.spatial.conv.", ".attention.spatial.conv."),
    (".cbam.SpatialGate.spatial.bn.", ".attention.spatial.bn."),
)
_OFFICIAL_KEY = re.compile("|".join(re.escape(official) for official, _ in _OFFICIAL_TO_OURS))
_OURS_BY_OFFICIAL = dict(_OFFICIAL_TO_OURS)


def official_key_to_ours(key: str) -> str:
    """``module.layer1.0.cbam.ChannelGate.mlp.1.weight`` -> ``layer1.0.attention.channel.fc1.weight``."""
    key = key.removeprefix("module.")
    return _OFFICIAL_KEY.sub(lambda m: _OURS_BY_OFFICIAL[m.group(0)], key)


def _read_official_state_dict(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise CheckpointNotFoundError(f"no checkpoint file at {path}")
    try:
        # weights_only=True: tensors and plain containers only; a pickle can never run code here.
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message is long advice on how to load unsafely; keep only its "what" part.
        found = re.search(r"Unsupported \w+: \S+(?: \S+)?|invalid load key, \S+", str(exc))
        reason = found.group(0) if found else type(exc).__name__
        if "Weights only load failed" in str(exc):
            raise NotACheckpointError(
                f"refused to load {path}: it holds objects other than tensors and plain containers, and "
                f"pickles are only opened with torch.load(weights_only=True) ({reason})"
            ) from exc
        raise NotACheckpointError(f"{path} is not a PyTorch checkpoint ({reason})") from exc
    except Exception as exc:  # the weights-only unpickler fails on garbage in many ways (IndexError, ...)
        raise NotACheckpointError(
            f"{path} is not a PyTorch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    state_dict = obj.get("state_dict", obj) if isinstance(obj, dict) else None
    if not isinstance(state_dict, dict) or not all(isinstance(v, Tensor) for v in state_dict.values()):
        raise NotACheckpointError(f"{path} holds no state_dict of tensors (got {type(obj).__name__})")
    return {official_key_to_ours(k): v for k, v in state_dict.items()}


def load_official_checkpoint(
    path: str | os.PathLike, arch: str, map_location: str | torch.device = "cpu"
) -> nn.Module:
    """Load one of the CBAM authors' released checkpoints into ``create_model(arch)``, in eval mode.

    ``num_classes`` comes from the file's ``fc.weight``. Files saved before PyTorch 0.4.1 have no
    BatchNorm ``num_batches_tracked``; those counters start at 0.
    """
    path = Path(path)
    tensors = _read_official_state_dict(path)
    fc = tensors.get("fc.weight")
    num_classes = fc.shape[0] if fc is not None and fc.ndim == 2 else 1000
    meta = _official_metadata(arch, num_classes, labels=None, version="official")
    model = _build(meta, str(path))
    for key, value in model.state_dict().items():
        if key.endswith(".num_batches_tracked") and key not in tensors:
            tensors[key] = torch.zeros_like(value, device="cpu")
    return _load_into(model, tensors, str(path)).to(map_location)


def _official_metadata(
    arch: str, num_classes: int, labels: Sequence[str] | None, version: str
) -> CheckpointMetadata:
    if arch not in list_models():
        raise UnknownArchitectureError(f"unknown architecture {arch!r}; choose one of {list_models()}")
    labels = list(labels) if labels is not None else [str(i) for i in range(num_classes)]
    if len(labels) != num_classes:
        raise CheckpointError(f"{len(labels)} labels given for a checkpoint with {num_classes} classes")
    return CheckpointMetadata(
        arch=arch,
        num_classes=num_classes,
        labels=labels,
        input_size=default_input_size(arch),
        mean=IMAGENET_MEAN,  # the authors trained with torchvision's ImageNet normalisation
        std=IMAGENET_STD,
        version=version,
    )


def convert_official_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    arch: str,
    *,
    labels: Sequence[str] | None = None,
    version: str = "official",
) -> CheckpointMetadata:
    """Convert an authors' checkpoint at ``src`` into our format at ``dst``; returns its metadata.

    ``labels`` default to ``"0"``, ``"1"``, ...; the input size is the architecture's default and the
    normalisation ImageNet's.
    """
    model = load_official_checkpoint(src, arch)
    meta = _official_metadata(arch, model.fc.out_features, labels, version)
    save_checkpoint(model, dst, meta)
    return meta
