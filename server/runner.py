"""Runs the model: one forward pass per batch, with the backend chosen for it, checked and warmed up.

    runner = ModelRunner.from_settings(settings.model, max_batch_size=32)   # load, choose, check
    runner.warm_up(warm_up_sizes(32))                                       # every batch size once
    outputs = runner.run_batch([BatchItem(pixels, blocks), ...])            # one ItemOutput per item

``run_batch`` is synchronous and meant for one dedicated thread, so the event loop keeps accepting
requests while a batch computes. The forward asks for attention maps only when at least one request
in the batch did, and then only for the union of the blocks they asked for; only the rows of the
requests that asked are copied back to the host. The batch itself is assembled (normalised, on the
device) by ``server.assembly``; the backends are ``server.backends``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch
from torch import nn

from server.assembly import BatchAssembler, batch_buckets, bucket_for, split_into_buckets
from server.backends import AUTO, BackendUnavailable, create_backend, registered_name
from server.backends.auto import auto_candidates
from server.backends.base import BackendTarget, ModelBackend
from server.backends.cache import ArtefactCache
from server.backends.eager import EagerBackend
from server.config import ModelSettings
from server.errors import OutOfMemory, StartupError
from server.loading import load_model, resolve_device, resolve_dtype

if TYPE_CHECKING:
    from models import CheckpointMetadata

__all__ = ["BatchItem", "InjectedFault", "ItemOutput", "ModelDescription", "ModelRunner", "warm_up_sizes"]

_log = logging.getLogger(__name__)
_CPU = torch.device("cpu")


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
    """One image, or a chunk of several, and the blocks whose maps it wants (None: no maps).

    ``tensor`` is uint8 pixels, H x W x 3 at the model's input size (normalised in the batch), or an
    already normalised float32 3 x H x W tensor; a chunk is N of either (N x H x W x 3, N x 3 x H x W),
    assembled into N rows of the batch with one copy.
    """

    tensor: torch.Tensor
    blocks: frozenset[str] | None = None

    @property
    def chunk(self) -> bool:
        return self.tensor.dim() == 4

    @property
    def count(self) -> int:
        """Images it holds (its rows in the batch)."""
        return self.tensor.shape[0] if self.tensor.dim() == 4 else 1


@dataclass(frozen=True)
class ItemOutput:
    """An item's logits and its maps: block -> {"channel": C or None, "spatial": H x W or None};
    for a chunk of N, each with N rows first (N x classes, N x C, N x H x W)."""

    logits: torch.Tensor
    maps: dict[str, dict[str, torch.Tensor | None]]


def warm_up_sizes(max_batch_size: int) -> list[int]:
    """The batch sizes to warm up: the buckets, every size the batcher's batches are run as."""
    return batch_buckets(max_batch_size)


class ModelRunner:
    """A model on its device, ready for batches. Build it with ``from_settings``.

    ``backend`` is a registered name, ``auto`` (try the fastest for the device first, fall back to
    eager), or a ``ModelBackend`` already built around ``model`` (served as given). A backend other
    than eager is checked against the eager module before the runner is returned.
    """

    def __init__(
        self,
        model: nn.Module,
        meta: CheckpointMetadata,
        *,
        device: torch.device = _CPU,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        backend: str | ModelBackend = "eager",
        max_batch_size: int = 32,
        cache: ArtefactCache | None = None,
    ) -> None:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self._model = model.eval().to(device=device, dtype=dtype, memory_format=memory_format)
        self.device = device
        self.dtype = dtype
        self.buckets = batch_buckets(max_batch_size)
        input_size = (int(meta.input_size[0]), int(meta.input_size[1]))
        self._assembler = BatchAssembler(
            input_size, meta.mean, meta.std, device=device, dtype=dtype, channels_last=channels_last,
            rows=self.buckets[-1],
        )  # fmt: skip
        threads = torch.get_num_threads()
        self._target = BackendTarget(device, dtype, input_size, threads, cache or ArtefactCache())
        self._fail_next = threading.Event()  # fail_next_forward(): set on the event loop, read in the forward
        self.description = ModelDescription(
            arch=meta.arch,
            version=meta.version,
            labels=tuple(meta.labels),
            input_size=input_size,
            mean=tuple(float(m) for m in meta.mean),  # type: ignore[arg-type]
            std=tuple(float(s) for s in meta.std),  # type: ignore[arg-type]
            device=str(device),
            dtype=str(dtype).removeprefix("torch."),
            attention_blocks=tuple(getattr(model, "attention_blocks", ())),
            num_parameters=sum(p.numel() for p in model.parameters()),
        )
        self._backend, name = self._choose_backend(backend)
        self.description = replace(self.description, backend=name)

    @classmethod
    def from_settings(cls, settings: ModelSettings, max_batch_size: int = 32) -> ModelRunner:
        """Load the checkpoint (or build ``arch`` with random weights) on the configured device and dtype,
        with the configured backend. Raises StartupError naming the field that cannot be honoured here.
        """
        device = resolve_device(settings.device)
        dtype = resolve_dtype(settings.dtype, device)
        model, meta = load_model(settings)
        return cls(
            model,
            meta,
            device=device,
            dtype=dtype,
            channels_last=settings.channels_last,
            backend=settings.backend,
            max_batch_size=max_batch_size,
            cache=ArtefactCache(settings.cache_dir),
        )

    def run_batch(self, items: Sequence[BatchItem], *, retry: bool = True) -> list[ItemOutput]:
        """One forward pass over ``items``; maps only if some item asked, for the blocks any asked for.

        When the device runs out of memory the batch is split in halves until the parts fit, so a
        batch too large for the moment still gets right answers; one image that does not fit alone
        raises OutOfMemory. A forward that fails otherwise is run once more: a passing fault costs
        time, not answers; one that stays fails the batch.
        """
        try:
            return self._forward(items, self._backend)
        except torch.cuda.OutOfMemoryError as exc:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            images = sum(item.count for item in items)
            if images == 1:
                raise OutOfMemory(f"out of memory on {self.device} for a single image: {exc}") from None
            _log.warning("out of memory, splitting the batch", extra={"fields": {"batch_size": images}})
            if len(items) == 1:  # one chunk: its halves, joined back
                (item,) = items
                half = item.count // 2
                parts = [replace(item, tensor=item.tensor[:half]), replace(item, tensor=item.tensor[half:])]
                return [_join_rows(self.run_batch(parts[:1]) + self.run_batch(parts[1:]))]
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

    def warm_up(self, batch_sizes: Iterable[int]) -> None:
        """Run every batch size once (and attention once), so the first requests pay no set-up cost.

        Raises StartupError naming model.dtype when the dtype does not work on this device.
        """
        height, width = self.description.input_size
        all_blocks = frozenset(self.description.attention_blocks)
        pixels = torch.zeros(height, width, 3, dtype=torch.uint8)
        sizes = list(batch_sizes)
        if self._backend.batch_shapes != "any":  # every bucket is a graph to build
            sizes = sorted(set(sizes) | set(self.buckets))
        with self._dtype_errors():
            for size in sizes:
                self.run_batch([BatchItem(pixels)] * size)
            self.run_batch([BatchItem(pixels, all_blocks)])
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _choose_backend(self, requested: str | ModelBackend) -> tuple[ModelBackend, str]:
        """The backend to serve with, built and checked against eager, and its name."""
        if isinstance(requested, ModelBackend):
            name = registered_name(type(requested)) or type(requested).__name__
            self._check_against_eager(requested, name)
            return requested, name
        if requested != AUTO:
            started = time.monotonic()
            try:
                backend = create_backend(requested, self._model, self._target)
            except BackendUnavailable as exc:
                raise StartupError("model.backend", str(exc)) from None
            self._check_against_eager(backend, requested)
            self._log_choice(requested, requested, "asked for by name", started)
            return backend, requested
        candidates = auto_candidates(self._target)
        for name, why in candidates:
            started = time.monotonic()
            try:
                backend = create_backend(name, self._model, self._target)
                self._check_against_eager(backend, name)
            except Exception as exc:  # whatever stops it (not installed, export, check), the next one
                if name == candidates[-1][0]:
                    raise
                # Not installed is a choice the deployment made; a failed build or check is a fault.
                level = logging.INFO if isinstance(exc, BackendUnavailable) else logging.WARNING
                _log.log(
                    level,
                    "backend fallback",
                    extra={"fields": {"requested": AUTO, "backend": name, "error": str(exc),
                                      "seconds": round(time.monotonic() - started, 3)}},
                )  # fmt: skip
                continue
            self._log_choice(AUTO, name, why, started)
            return backend, name
        raise AssertionError("auto_candidates ends with eager, which always builds")

    def _log_choice(self, requested: str, name: str, why: str, started: float) -> None:
        fields = {
            "requested": requested,
            "backend": name,
            "reason": why,
            "device": str(self.device),
            "dtype": self.description.dtype,
            "arch": self.description.arch,
            "seconds": round(time.monotonic() - started, 3),
        }
        _log.info("backend chosen", extra={"fields": fields})

    @contextlib.contextmanager
    def _dtype_errors(self) -> Iterator[None]:
        """A RuntimeError from a forward in a dtype other than float32 is the dtype's fault: say so."""
        try:
            yield
        except RuntimeError as exc:
            if self.dtype is torch.float32:
                raise
            raise StartupError("model.dtype", f"{self.description.dtype} does not run on "
                               f"{self.device}: {exc}") from None  # fmt: skip

    def _forward(self, items: Sequence[BatchItem], backend: ModelBackend) -> list[ItemOutput]:
        if self._fail_next.is_set():
            self._fail_next.clear()
            raise InjectedFault(f"fault injected into a forward of {len(items)} images (SIGUSR1)")
        wanted: set[str] = set()
        for item in items:
            if item.blocks is not None:
                wanted |= item.blocks
        starts, total = [], 0  # each item's first row
        for item in items:
            starts.append(total)
            total += item.count
        asking = [i for i, item in enumerate(items) if item.blocks is not None]
        blocks = sorted(wanted) if asking else None
        # A static-shape backend gets bucket-sized batches: padded up to the bucket, or run as
        # bucket-sized pieces (17 = 16 + 1); the backend says which suits its device.
        shapes = backend.batch_shapes
        size = bucket_for(total, self.buckets) if shapes == "pad" else total
        with torch.inference_mode():
            x = self._assembler.assemble([item.tensor for item in items], size)
            if shapes == "split" and blocks is None:
                pieces, start = [], 0
                for piece in split_into_buckets(total, self.buckets):
                    pieces.append(backend.run(x[start : start + piece], None)[0])
                    start += piece
                logits, maps = torch.cat(pieces), {}
            else:
                logits, maps = backend.run(x, blocks)
            logits = logits[:total].float().cpu()
            # Maps go to the host only for the rows that asked for them.
            rows = None
            if asking and sum(items[i].count for i in asking) < total:
                spans = [torch.arange(starts[i], starts[i] + items[i].count) for i in asking]
                rows = torch.cat(spans).to(self.device)
            host = {
                name: {"channel": _rows_to_host(m.channel, rows), "spatial": _rows_to_host(m.spatial, rows)}
                for name, m in maps.items()
            }
        at, seen = {}, 0  # an asking item's first row among the rows sent to the host
        for i in asking:
            at[i] = seen
            seen += items[i].count
        outputs = []
        for i, item in enumerate(items):
            mine = {} if item.blocks is None else {
                name: {kind: None if t is None else _take(t, at[i], item) for kind, t in kinds.items()}
                for name, kinds in host.items() if name in item.blocks
            }  # fmt: skip
            outputs.append(ItemOutput(_take(logits, starts[i], item), mine))
        return outputs

    def _check_against_eager(
        self, backend: ModelBackend, name: str, atol: float = 1e-3, rtol: float = 1e-3
    ) -> None:
        """Refuse to serve a backend whose logits or maps differ from the eager module's: a batch
        without maps (the usual one, which a backend may run on a path of its own) and one with every
        map."""
        if isinstance(backend, EagerBackend):
            return
        height, width = self.description.input_size
        generator = torch.Generator().manual_seed(0)
        pixels = torch.randint(0, 256, (3, height, width, 3), dtype=torch.uint8, generator=generator)
        blocks = frozenset(self.description.attention_blocks) or None
        with self._dtype_errors():
            plain = self._forward([BatchItem(p) for p in pixels], backend)
            got = self._forward([BatchItem(p, blocks) for p in pixels], backend)
            with torch.inference_mode():
                x = self._assembler.assemble(list(pixels))
                if blocks:
                    want, maps = self._model.forward_with_attention(x, blocks=sorted(blocks))
                else:
                    want, maps = self._model(x), {}
                want = want.float().cpu()
        allowed = atol + rtol * want.abs().max().item()
        error = max(
            (out.logits - want[row]).abs().max().item()
            for outputs in (plain, got)
            for row, out in enumerate(outputs)
        )
        for block, m in maps.items():
            for kind, t in (("channel", m.channel), ("spatial", m.spatial)):
                if t is not None:
                    t = t.float().cpu()
                    error = max(error, *((out.maps[block][kind] - t[row]).abs().max().item()
                                         for row, out in enumerate(got)))  # fmt: skip
        if error > allowed:
            raise StartupError(
                "model.backend",
                f"{name} differs from eager by {error:.3g} (allowed {allowed:.3g}); use model.backend eager",
            )


def _take(t: torch.Tensor, row: int, item: BatchItem) -> torch.Tensor:
    """An item's part of a batch's output: its row, or a chunk's rows."""
    return t[row : row + item.count] if item.chunk else t[row]


def _join_rows(outputs: Sequence[ItemOutput]) -> ItemOutput:
    """Chunk outputs (run apart) as one, rows in order."""
    maps = {
        name: {kind: None if t is None else torch.cat([o.maps[name][kind] for o in outputs])
               for kind, t in kinds.items()}
        for name, kinds in outputs[0].maps.items()
    }  # fmt: skip
    return ItemOutput(torch.cat([o.logits for o in outputs]), maps)


def _rows_to_host(t: torch.Tensor | None, rows: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    return (t if rows is None else t.index_select(0, rows)).float().cpu()
