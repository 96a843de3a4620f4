"""A batch before its forward: its shape (buckets) and its contents (normalised pixels on the device).

Images arrive as uint8 pixels (H x W x 3) and are normalised once, in the batch: on the CPU one fused
multiply-add per batch writes straight into a preallocated channels-last batch; on CUDA the uint8
batch (a quarter of float32's bytes) goes through a pinned buffer, is copied without blocking, and is
normalised on the device. Backends that compile one graph per shape get bucket-sized batches.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["BatchAssembler", "batch_buckets", "bucket_for", "split_into_buckets"]

_CPU = torch.device("cpu")


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


class BatchAssembler:
    """Writes images into one preallocated batch on ``device``, normalised: ``(x / 255 - mean) / std``.

    ``staging`` (default: on CUDA) sends uint8 pixels through a host buffer (pinned on CUDA) with one
    copy, and normalises them after it, on the device; without it they are normalised on the host.
    """

    def __init__(
        self,
        input_size: tuple[int, int],
        mean: Sequence[float],
        std: Sequence[float],
        *,
        device: torch.device = _CPU,
        dtype: torch.dtype = torch.float32,
        channels_last: bool = True,
        rows: int = 32,
        staging: bool | None = None,
    ) -> None:
        height, width = int(input_size[0]), int(input_size[1])
        self.device = device
        self.dtype = dtype
        self._channels_last = channels_last
        # (x / 255 - mean) / std as one multiply-add: x * scale + shift, per channel (NHWC's last axis).
        std_ = torch.tensor([float(v) for v in std], dtype=torch.float64)
        mean_ = torch.tensor([float(v) for v in mean], dtype=torch.float64)
        self._scale = (1.0 / (255.0 * std_)).to(device=device, dtype=torch.float32)
        self._shift = (-mean_ / std_).to(device=device, dtype=torch.float32)
        # B x H x W x 3 is channels-last B x 3 x H x W: the batch needs no further copy.
        self._batch = torch.zeros(rows, height, width, 3, device=device, dtype=dtype)
        self._staged = device.type == "cuda" if staging is None else staging
        self._pixels = self._host_pixels(rows)  # uint8, stacked (and on CUDA copied) before normalising

    def _host_pixels(self, rows: int) -> torch.Tensor:
        pixels = torch.zeros(rows, *self._batch.shape[1:], dtype=torch.uint8)
        return pixels.pin_memory() if self._staged and self.device.type == "cuda" else pixels

    def assemble(self, images: Sequence[torch.Tensor], size: int | None = None) -> torch.Tensor:
        """The normalised batch on the device, B x 3 x H x W (``size`` rows: the images, then padding).

        Each image is uint8 pixels (H x W x 3) or an already normalised float32 3 x H x W tensor. The
        batch is the assembler's own buffer: it is valid until the next call.
        """
        n = len(images)
        size = n if size is None else size
        if size > self._batch.shape[0]:  # beyond the rows it was made for (a direct call with a large batch)
            self._batch = torch.zeros(size, *self._batch.shape[1:], device=self.device, dtype=self.dtype)
            self._pixels = self._host_pixels(size)
        batch = self._batch[:size]
        if n > 1 and all(t.dtype == torch.uint8 for t in images):
            # The common case, whole: one stack into the uint8 buffer and one multiply-add for the
            # batch (per-image calls cost a few microseconds each, as much as a small image's copy).
            torch.stack(list(images), out=self._pixels[:n])
            pixels = self._pixels[:n].to(self.device, non_blocking=True)  # the same tensor on the CPU
            torch.addcmul(self._shift, pixels, self._scale, out=batch[:n])
        else:
            staged_rows = []
            for row, t in enumerate(images):
                if t.dtype != torch.uint8:  # already normalised, 3 x H x W
                    batch[row].copy_(t.permute(1, 2, 0))
                elif self._staged:
                    self._pixels[row].copy_(t)
                    staged_rows.append(row)
                else:
                    torch.addcmul(self._shift, t, self._scale, out=batch[row])
            if staged_rows:  # one non-blocking copy of uint8, normalised on the device
                pixels = self._pixels[:n].to(self.device, non_blocking=True)
                for row in staged_rows:
                    torch.addcmul(self._shift, pixels[row], self._scale, out=batch[row])
        x = batch.permute(0, 3, 1, 2)  # channels-last memory, B x 3 x H x W
        return x if self._channels_last else x.contiguous()
