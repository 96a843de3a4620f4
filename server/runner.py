"""Runs the model: device, dtype, memory format, backend, warm-up, and one forward pass per batch.

``run_batch`` is synchronous and meant for one dedicated thread, so the event loop keeps accepting
requests while a batch computes. The forward asks for attention maps only when at least one request
in the batch did, and then only for the union of the blocks they asked for; only the rows of the
requests that asked are copied back to the host.

Images arrive as uint8 pixels (H x W x 3) and are normalised once, in the batch: on the CPU one fused
multiply-add per image writes straight into a preallocated channels-last batch; on CUDA the uint8
batch (a quarter of float32's bytes) goes through a pinned buffer, is copied without blocking, and is
normalised on the device. Backends that compile one graph per shape get bucket-sized batches
(``batch_buckets``): padded up on CUDA, split into buckets on the CPU.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from server.backends import BACKENDS, EagerBackend, ModelBackend, create_backend
from server.config import ModelSettings, usable_cores
from server.errors import OutOfMemory, StartupError

__all__ = [
    "BatchItem",
    "InjectedFault",
    "ItemOutput",
    "ModelDescription",
    "ModelRunner",
    "batch_buckets",
    "bucket_for",
    "split_into_buckets",
    "configure_malloc",
    "configure_torch_threads",
    "resolve_device",
    "warm_up_sizes",
]

_log = logging.getLogger(__name__)
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class InjectedFault(RuntimeError):
    """Raised by a forward on purpose: ``ModelRunner.fail_next_forward`` (fault-injection runs)."""


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
    backend: str = "eager"


@dataclass(frozen=True)
class BatchItem:
    """One image and the blocks whose maps it wants (None: no maps).

    ``tensor`` is uint8 pixels, H x W x 3 at the model's input size (normalised in the batch), or an
    already normalised float32 3 x H x W tensor.
    """

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


def configure_malloc() -> bool:
    """Keep freed activation-sized blocks in the heap instead of giving them back to the kernel (glibc).

    By default glibc serves each block over 128 kB (grown on the fly, up to 32 MB) with a fresh mmap and
    trims the heap top on free, so every forward page-faults its activations in again: 20,000 faults
    per cbam_resnet50 forward at batch 8 and 500,000 at 32 on our CPU box. With the mmap threshold at
    its 32 MB maximum and trimming off, batch 8 has none and batch 32 40% fewer, 5-19% less CPU time
    (docs/PERFORMANCE.md). The cost: the heap stays at its peak, which every busy minute reaches anyway.
    Returns False where there is no glibc (musl, macOS) and nothing changed.
    """
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    mmap_ok = mallopt(m_mmap_threshold, 32 * 1024 * 1024)
    trim_ok = mallopt(m_trim_threshold, 2**31 - 1)
    return bool(mmap_ok and trim_ok)


def batch_buckets(max_batch_size: int) -> list[int]:
    """The shapes a static-shape backend compiles: powers of two below ``max_batch_size``, and itself.

    A batch is padded up to the smallest bucket that holds it, so at most half of a forward is padding
    and only log2(max_batch_size) + 1 graphs (or CUDA graphs) are built.
    """
    sizes, size = [], 1
    while size < max_batch_size:
        sizes.append(size)
        size *= 2
    return [*sizes, max_batch_size]


# The batch sizes to warm up are the buckets: every size the batcher's batches are run as.
warm_up_sizes = batch_buckets


def split_into_buckets(size: int, buckets: Sequence[int]) -> list[int]:
    """``size`` as a sum of buckets, largest first: 17 -> [16, 1], 7 -> [4, 2, 1] (buckets 1, 2, 4, ...)."""
    pieces = []
    while size > 0:
        piece = max((b for b in buckets if b <= size), default=size)
        pieces.append(piece)
        size -= piece
    return pieces


def bucket_for(size: int, buckets: Sequence[int]) -> int:
    """The smallest bucket that holds ``size`` items (``size`` itself beyond the largest)."""
    return next((b for b in buckets if b >= size), size)


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
        backend: str = "eager",
        max_batch_size: int = 32,
    ) -> None:
        if backend not in BACKENDS:
            raise StartupError("model.backend", f"unknown backend {backend!r}; choose one of {BACKENDS}")
        self._memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._model = model.eval().to(device=device, dtype=dtype, memory_format=self._memory_format)
        self.device = device
        self.dtype = dtype
        self.buckets = batch_buckets(max_batch_size)
        # Static-shape backends: pad a batch up to its bucket (CUDA graphs), or split it into buckets.
        self.pad_to_buckets = device.type == "cuda"
        height, width = int(input_size[0]), int(input_size[1])
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift, per channel (NHWC's last axis).
        std_ = torch.tensor([float(v) for v in std], dtype=torch.float64)
        mean_ = torch.tensor([float(v) for v in mean], dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_)).to(device=device, dtype=torch.float32)
        self._shift = (-mean_ / std_).to(device=device, dtype=torch.float32)
        # The batch, preallocated for the largest bucket: B x H x W x 3 is channels-last B x 3 x H x W.
        self._batch = torch.zeros(self.buckets[-1], height, width, 3, device=device, dtype=dtype)
        self._fail_next = threading.Event()  # fail_next_forward(): set on the event loop, read in the forward
        self._staging: torch.Tensor | None = None  # CUDA: pinned uint8 pixels, copied without blocking
        self._pixels: torch.Tensor | None = None  # CPU: uint8 pixels stacked before normalising
        if device.type != "cuda":
            self._pixels = torch.zeros(self.buckets[-1], height, width, 3, dtype=torch.uint8)
        else:  # uint8 pixels go to the device through a pinned buffer
            self._staging = torch.zeros(self.buckets[-1], height, width, 3, dtype=torch.uint8).pin_memory()
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
            backend=backend,
        )
        try:
            self._backend: ModelBackend = create_backend(
                backend,
                lambda: self._model,
                device=device,
                dtype=dtype,
                input_size=(height, width),
                threads=torch.get_num_threads(),
            )
        except ValueError as exc:
            raise StartupError("model.backend", str(exc)) from None

    @property
    def model(self) -> nn.Module:
        """The served module. Assigning another one serves it eagerly (a seam for tests): a compiled
        or exported graph of the old module would not see it."""
        return self._model

    @model.setter
    def model(self, module: nn.Module) -> None:
        self._model = module
        self._backend = EagerBackend(lambda: self._model)

    @classmethod
    def from_settings(cls, settings: ModelSettings, max_batch_size: int = 32) -> ModelRunner:
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
            meta = models.CheckpointMetadata(  # ImageNet normalisation, the metadata's default
                arch=settings.arch,
                num_classes=settings.num_classes,
                labels=[f"class_{i}" for i in range(settings.num_classes)],
                input_size=model.input_size,
                version=f"random-seed{settings.seed}",
            )
        else:
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
            backend=settings.backend,
            max_batch_size=max_batch_size,
        )

    def run_batch(self, items: Sequence[BatchItem], *, retry: bool = True) -> list[ItemOutput]:
        """One forward pass over ``items``; maps only if some item asked, for the blocks any asked for.

        When the device runs out of memory the batch is split in halves until the parts fit, so a
        batch too large for the moment still gets right answers; one image that does not fit alone
        raises OutOfMemory. A forward that fails otherwise is run once more: a passing fault costs
        time, not answers; one that stays fails the batch.
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
        except Exception as exc:
            if not retry:
                raise
            fields = {"batch_size": len(items), "error": repr(exc)}
            _log.warning("forward failed, running the batch once more", extra={"fields": fields})
            return self.run_batch(items, retry=False)

    def fail_next_forward(self) -> None:
        """Make the next forward raise, once (debug.fail_batch_on_sigusr1: fault-injection runs)."""
        self._fail_next.set()

    def _forward(self, items: Sequence[BatchItem]) -> list[ItemOutput]:
        if self._fail_next.is_set():
            self._fail_next.clear()
            raise InjectedFault(f"fault injected into a forward of {len(items)} images (SIGUSR1)")
        wanted: set[str] = set()
        for item in items:
            if item.blocks is not None:
                wanted |= item.blocks
        asking = [row for row, item in enumerate(items) if item.blocks is not None]
        blocks = sorted(wanted) if asking else None
        # A static-shape backend gets bucket-sized batches. On CUDA the batch is padded up to its
        # bucket (one launch of one captured graph); on the CPU, where padding is paid in full compute
        # (a batch of 17 padded to 32 halved cbam_resnet50's throughput), it runs as bucket-sized
        # pieces instead: 17 = 16 + 1.
        pad = self._backend.static_batch and self.pad_to_buckets
        size = bucket_for(len(items), self.buckets) if pad else len(items)
        with torch.inference_mode():
            x = self.assemble(items, size)
            if self._backend.static_batch and not pad and blocks is None:
                pieces, start = [], 0
                for piece in split_into_buckets(len(items), self.buckets):
                    pieces.append(self._backend.run(x[start : start + piece], None)[0])
                    start += piece
                logits, maps = torch.cat(pieces), {}
            else:
                logits, maps = self._backend.run(x, blocks)
            logits = logits[: len(items)].float().cpu()
            # Maps go to the host only for the rows that asked for them.
            rows = None if len(asking) == len(items) else torch.tensor(asking, device=self.device)
            host = {
                name: {"channel": _rows_to_host(m.channel, rows), "spatial": _rows_to_host(m.spatial, rows)}
                for name, m in maps.items()
            }
        at = {row: i for i, row in enumerate(asking)}
        outputs = []
        for row, item in enumerate(items):
            mine = {} if item.blocks is None else {
                name: {kind: None if t is None else t[at[row]] for kind, t in kinds.items()}
                for name, kinds in host.items() if name in item.blocks
            }  # fmt: skip
            outputs.append(ItemOutput(logits[row], mine))
        return outputs

    def assemble(self, items: Sequence[BatchItem], size: int | None = None) -> torch.Tensor:
        """The normalised batch on the device, B x 3 x H x W (``size`` rows: the items, then padding).

        uint8 pixels are normalised in one fused multiply-add straight into the preallocated batch; on
        CUDA they travel as uint8 through a pinned buffer and are normalised on the device.
        """
        size = len(items) if size is None else size
        if size > self._batch.shape[0]:  # beyond the largest bucket (a direct call with a large batch)
            self._batch = torch.zeros(size, *self._batch.shape[1:], device=self.device, dtype=self.dtype)
            if self._pixels is not None:
                self._pixels = torch.zeros(size, *self._pixels.shape[1:], dtype=torch.uint8)
            if self._staging is not None:
                self._staging = torch.zeros(size, *self._staging.shape[1:], dtype=torch.uint8).pin_memory()
        batch = self._batch[:size]
        staging = self._staging
        n = len(items)
        if n > 1 and all(item.tensor.dtype == torch.uint8 for item in items):
            # The common case, whole: one stack into the uint8 buffer and one multiply-add for the
            # batch (per-image calls cost a few microseconds each, as much as a small image's copy).
            host = staging if staging is not None else self._pixels
            torch.stack([item.tensor for item in items], out=host[:n])
            pixels = host[:n].to(self.device, non_blocking=True)  # the same tensor on the CPU
            torch.addcmul(self._shift, pixels, self._scale, out=batch[:n])
        else:
            pixel_rows = []
            for row, item in enumerate(items):
                t = item.tensor
                if t.dtype != torch.uint8:  # already normalised, 3 x H x W
                    batch[row].copy_(t.permute(1, 2, 0))
                elif staging is not None:
                    staging[row].copy_(t)
                    pixel_rows.append(row)
                else:
                    torch.addcmul(self._shift, t, self._scale, out=batch[row])
            if pixel_rows:  # CUDA: one non-blocking copy of uint8, normalised on the device
                pixels = staging[:n].to(self.device, non_blocking=True)
                for row in pixel_rows:
                    torch.addcmul(self._shift, pixels[row], self._scale, out=batch[row])
        x = batch.permute(0, 3, 1, 2)  # channels-last memory, B x 3 x H x W
        return x if self._memory_format is torch.channels_last else x.contiguous()

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every batch size once (and attention once), so the first requests pay no set-up cost.

        Raises StartupError naming model.dtype when the dtype does not work on this device.
        """
        height, width = self.description.input_size
        all_blocks = frozenset(self.description.attention_blocks)
        pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
        sizes = list(batch_sizes)
        if self._backend.static_batch:  # every bucket is a graph to build
            sizes = sorted(set(sizes) | set(self.buckets))
        try:
            for size in sizes:
                self.run_batch([BatchItem(pixels)] * size)
            self.run_batch([BatchItem(pixels, all_blocks)])
            self._check_against_eager()
        except RuntimeError as exc:
            if self.dtype is torch.float32:
                raise
            raise StartupError("model.dtype", f"{self.description.dtype} does not run on "
                               f"{self.device}: {exc}") from None  # fmt: skip
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _check_against_eager(self, atol: float = 1e-3, rtol: float = 1e-3) -> None:
        """Refuse to serve a backend whose logits or maps differ from the eager module's."""
        if isinstance(self._backend, EagerBackend):
            return
        height, width = self.description.input_size
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8, generator=generator)
        blocks = frozenset(self.description.attention_blocks) or None
        items = [BatchItem(p, blocks) for p in pixels]
        got = self._forward(items)
        with torch.inference_mode():
            x = self.assemble(items)
            if blocks:
                want, maps = self._model.forward_with_attention(x, blocks=sorted(blocks))
            else:
                want, maps = self._model(x), {}
            want = want.float().cpu()
        allowed = atol + rtol * want.abs().max().item()
        error = max((out.logits - want[row]).abs().max().item() for row, out in enumerate(got))
        for name, m in maps.items():
            for kind, t in (("channel", m.channel), ("spatial", m.spatial)):
                if t is not None:
                    t = t.float().cpu()
                    error = max(error, *((out.maps[name][kind] - t[row]).abs().max().item()
                                         for row, out in enumerate(got)))  # fmt: skip
        if error > allowed:
            raise StartupError(
                "model.backend",
                f"{self.description.backend} differs from eager by {error:.3g} (allowed {allowed:.3g}); "
                "use model.backend eager",
            )


def _rows_to_host(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t if rows is None else t.index_select(0, rows)).float().cpu()


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
