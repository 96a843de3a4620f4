"""Process-wide settings for serving a model: torch's threads and glibc's allocator. Called once at start
(``build_server``), and by the benchmark so that its in-process ceiling runs as the server does."""

from __future__ import annotations

import ctypes
import logging

import torch

from server.config import usable_cores

__all__ = ["configure_malloc", "configure_torch_threads"]

_log = logging.getLogger(__name__)


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
