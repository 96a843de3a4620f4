"""Runs the model: device, dtype, memory format, warm-up, and one forward pass per batch.

``run_batch`` is synchronous and meant for one dedicated thread, so the event loop keeps accepting
requests while a batch computes. The forward asks for attention maps only when at least one request
in the batch did, and then only for the union of the blocks they asked for.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.config import ModelSettings, usable_cores
from server.errors import OutOfMemory, StartupError

__all__ = [
    "BatchItem",
    "ItemOutput",
    "ModelDescription",
    "ModelRunner",
    "configure_torch_threads",
    "resolve_device",
    "warm_up_sizes",
]

_log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ModelDescription:
    """What is being served (the source of GetModelInfo and cbam_model_info)."""

    arch: str
    version: str
    labels: tuple[str, ...]
    input_size: tuple[int, int]  # (H, W)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    device: str
    dtype: str
    attention_blocks: tuple[str, ...]
    num_parameters: int


@dataclass(frozen=True)
class BatchItem:
    """One preprocessed image (float32, 3 x H x W) and the blocks whose maps it wants (None: no maps)."""

    tensor: torch.Tensor
    blocks: frozenset[str] | None = None


@dataclass(frozen=True)
class ItemOutput:
    """One image's logits and its maps: block -> {"channel": C or None, "spatial": H x W or None}."""

    logits: torch.Tensor
    maps: dict[str, dict[str, torch.Tensor | None]]


def configure_torch_threads() -> None:
    """Intra-op threads: the cores this process may use; inter-op: 1 (one forward at a time)."""
    torch.set_num_threads(usable_cores())
    if torch.get_num_interop_threads() != 1:
        try:
            torch.set_num_interop_threads(1)
        except RuntimeError:  # only settable before the first parallel work; keep what we have
            _log.warning("could not set torch inter-op threads to 1", extra={"fields": {}})


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes to warm up: powers of two below ``max_batch_size``, and itself."""
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


class ModelRunner:
    """A model on its device, ready for batches. Build it with ``from_settings``."""

    def __init__(
        self,
        model: nn.Module,
        *,
        arch: str,
        version: str,
        labels: Sequence[str],
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device,
        dtype: torch.dtype,
        channels_last: bool,
    ) -> None:
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.model = model.eval().to(device=device, dtype=dtype, memory_format=self._memory_format)
        self.device = device
        self.dtype = dtype
        blocks = tuple(getattr(model, "attention_blocks", ()))
        self.description = ModelDescription(
            arch=arch,
            version=version,
            labels=tuple(labels),
            input_size=(int(input_size[0]), int(input_size[1])),
            mean=tuple(float(m) for m in mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in std),  # type: ignore[arg-type]
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention_blocks=blocks,
            num_parameters=sum(p.numel() for p in model.parameters()),
        )

    @classmethod
    def from_settings(cls, settings: ModelSettings) -> ModelRunner:
        """Load the checkpoint (or build ``arch`` with random weights) on the configured device and dtype.

        Raises StartupError naming the field when a setting cannot be honoured here.
        """
        import models  # torch-only; imported here so the rest of the server loads without it

        device = resolve_device(settings.device)
        dtype = _DTYPES[settings.dtype]
        if dtype is torch.float16 and device.type != "cuda":
            raise StartupError("model.dtype", f"float16 needs a CUDA device, but model.device is {device}; "
                               "use float32 or bfloat16")  # fmt: skip
        if settings.arch is not None:
            if settings.arch not in models.list_models():
                raise StartupError("model.arch", f"unknown architecture {settings.arch!r}; "
                                   f"choose one of {models.list_models()}")  # fmt: skip
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(settings.seed)
                model = models.create_model(settings.arch, num_classes=settings.num_classes)
            return cls(
                model,
                arch=settings.arch,
                version=f"random-seed{settings.seed}",
                labels=[f"class_{i}" for i in range(settings.num_classes)],
                input_size=tuple(model.input_size),
                mean=_IMAGENET_MEAN,
                std=_IMAGENET_STD,
                device=device,
                dtype=dtype,
                channels_last=settings.channels_last,
            )
        path = Path(settings.checkpoint) if settings.checkpoint is not None else models.DEFAULT_CHECKPOINT
        try:
            model, meta = models.load_checkpoint(path, map_location="cpu")
        except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
            raise StartupError("model.checkpoint", str(exc)) from None
        return cls(
            model,
            arch=meta.arch,
            version=meta.version,
            labels=meta.labels,
            input_size=meta.input_size,
            mean=meta.mean,
            std=meta.std,
            device=device,
            dtype=dtype,
            channels_last=settings.channels_last,
        )

    def run_batch(self, items: Sequence[BatchItem]) -> list[ItemOutput]:
        """One forward pass over ``items``; maps only if some item asked, for the blocks any asked for.

        When the device runs out of memory the batch is split in halves until the parts fit, so a
        batch too large for the moment still gets right answers; one image that does not fit alone
        raises OutOfMemory.
        """
        try:
            return self._forward(items)
        except torch.cuda.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            if len(items) == 1:
                raise OutOfMemory(f"out of memory on {self.device} for a single image: {exc}") from None
            _log.warning("out of memory, splitting the batch", extra={"fields": {"batch_size": len(items)}})
            half = len(items) // 2
            return self.run_batch(items[:half]) + self.run_batch(items[half:])

    def _forward(self, items: Sequence[BatchItem]) -> list[ItemOutput]:
        wanted: set[str] = set()
        for item in items:
            if item.blocks is not None:
                wanted |= item.blocks
        asked = any(item.blocks is not None for item in items)
        x = torch.stack([item.tensor for item in items])
        if self.device.type == "cuda":
            x = x.pin_memory()
        x = x.to(self.device, self.dtype, non_blocking=True, memory_format=self._memory_format)
        with torch.inference_mode():
            if asked:
                logits, maps = self.model.forward_with_attention(x, blocks=sorted(wanted))
            else:
                logits, maps = self.model(x), {}
            logits = logits.float().cpu()
            maps = {
                name: {
                    "channel": None if m.channel is None else m.channel.float().cpu(),
                    "spatial": None if m.spatial is None else m.spatial.float().cpu(),
                }
                for name, m in maps.items()
            }
        outputs = []
        for row, item in enumerate(items):
            mine = {} if item.blocks is None else {
                name: {kind: None if t is None else t[row] for kind, t in kinds.items()}
                for name, kinds in maps.items() if name in item.blocks
            }  # fmt: skip
            outputs.append(ItemOutput(logits[row], mine))
        return outputs

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every batch size once (and attention once), so the first requests pay no set-up cost.

        Raises StartupError naming model.dtype when the dtype does not work on this device.
        """
        height, width = self.description.input_size
        all_blocks = frozenset(self.description.attention_blocks)
        try:
            for size in batch_sizes:
                self.run_batch([BatchItem(torch.zeros(3, height, width))] * size)
            self.run_batch([BatchItem(torch.zeros(3, height, width), all_blocks)])
        except RuntimeError as exc:
            if self.dtype is torch.float32:
                raise
            raise StartupError("model.dtype", f"{self.description.dtype} does not run on "
                               f"{self.device}: {exc}") from None  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


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
