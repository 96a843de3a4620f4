"""Built backends kept between starts (``model.cache_dir``): an export or a compilation is paid once.

    cache = ArtefactCache(Path("~/.cache/cbam-serve").expanduser())   # made if missing
    path = cache.path("onnx", key, ".onnx")     # None when the cache is off
    cache.store(path, data)                     # atomic; a failure is logged, never raised

A directory that cannot be made or written turns the cache off with one warning: the server then
builds everything at every start, as without a cache, but still serves.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

__all__ = ["ArtefactCache", "model_fingerprint"]

_log = logging.getLogger(__name__)


class ArtefactCache:
    """A directory of artefacts, each named by a key that changes whenever its content would."""

    def __init__(self, directory: Path | None = None) -> None:
        self.directory: Path | None = None
        if directory is None:
            return
        try:
            directory.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=directory):  # writable, not only present
                pass
        except OSError as exc:
            _log.warning(
                "artefact cache off",
                extra={"fields": {"cache_dir": str(directory), "error": str(exc),
                                  "effect": "every start builds its backend anew"}},
            )  # fmt: skip
            return
        self.directory = directory

    @property
    def enabled(self) -> bool:
        return self.directory is not None

    def path(self, kind: str, key: str, suffix: str = "") -> Path | None:
        """Where the artefact ``kind``/``key`` lives (present or not); None when the cache is off."""
        if self.directory is None:
            return None
        return self.directory / kind / f"{key}{suffix}"

    def folder(self, kind: str) -> Path | None:
        """A folder of its own for a tool that keeps its own cache (Inductor); None when off."""
        if self.directory is None:
            return None
        folder = self.directory / kind
        try:
            folder.mkdir(exist_ok=True)
        except OSError as exc:
            _log.warning("artefact cache folder unusable", extra={"fields": {"folder": str(folder),
                                                                             "error": str(exc)}})  # fmt: skip
            return None
        return folder

    def store(self, path: Path, data: bytes) -> bool:
        """Write ``data`` at ``path`` atomically (a reader never sees half a file). False if it failed."""
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                os.replace(temporary, path)
            except BaseException:
                Path(temporary).unlink(missing_ok=True)
                raise
        except OSError as exc:
            _log.warning("artefact not cached", extra={"fields": {"path": str(path), "error": str(exc)}})
            return False
        return True


def model_fingerprint(model: nn.Module) -> str:
    """A digest of what the module computes: its structure (repr: layers and their arguments) and every
    parameter and buffer, by name, dtype, shape and value. The same checkpoint, or the same
    architecture and seed, gives the same fingerprint in any process."""
    digest = hashlib.sha256()
    digest.update(f"{type(model).__module__}.{type(model).__qualname__}\n{model!r}\n".encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name} {t.dtype} {tuple(t.shape)}\n".encode())
        if t.numel():
            digest.update(t.view(-1).view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    return digest.hexdigest()
