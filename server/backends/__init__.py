"""The ways one batch runs through the model (``model.backend``), by name.

    backend = create_backend("onnxruntime", model, target)   # a ModelBackend, ready for batches
    logits, maps = backend.run(x, None)                      # x: B x 3 x H x W on the device
    list_backends()                                          # ["eager", "compile", "onnxruntime"]

A backend is one ``ModelBackend`` class (``base.py``) in a module of this package and one
``register_backend`` line at the end of this file. This module imports no torch: the settings check
``model.backend`` against these names and ``cbam-serve --help`` lists them without loading it, and a
backend's module is imported only when it is built. ``auto``, the default, is not a backend but the
choice of one (``auto.py``).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

    from server.backends.base import BackendTarget, ModelBackend

__all__ = [
    "AUTO",
    "BackendUnavailable",
    "backend_choices",
    "backend_class",
    "create_backend",
    "describe_backends",
    "list_backends",
    "register_backend",
    "registered_name",
]

AUTO = "auto"


class BackendUnavailable(ValueError):
    """A backend cannot run here: a package it needs is not installed, or it lacks the dtype."""


@dataclass(frozen=True)
class _Entry:
    target: str  # "module:Class"
    summary: str


_BACKENDS: dict[str, _Entry] = {}


def register_backend(name: str, target: str, summary: str) -> None:
    """Register the ``ModelBackend`` class at ``target`` ("package.module:Class") as ``name``.

    ``summary`` is what ``cbam-serve --help`` says of it. A name registered twice is refused.
    """
    if name in _BACKENDS or name == AUTO:
        raise ValueError(f"backend {name!r} is already registered")
    if target.count(":") != 1:
        raise ValueError(f"target should read 'package.module:Class', got {target!r}")
    _BACKENDS[name] = _Entry(target, summary)


def list_backends() -> list[str]:
    """Every registered backend name, in registration order."""
    return list(_BACKENDS)


def backend_choices() -> tuple[str, ...]:
    """What ``model.backend`` accepts: ``auto`` and every backend."""
    return (AUTO, *_BACKENDS)


def describe_backends() -> str:
    """One line per choice, for ``--help``."""
    return "; ".join(f"{name} ({entry.summary})" for name, entry in _BACKENDS.items())


def backend_class(name: str) -> type[ModelBackend]:
    """The class registered as ``name``, imported now."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {list_backends()}")
    module, _, attribute = _BACKENDS[name].target.partition(":")
    return getattr(importlib.import_module(module), attribute)


def registered_name(cls: type) -> str | None:
    """The name ``cls`` is registered under (None for a class of its own, e.g. a test's)."""
    target = f"{cls.__module__}:{cls.__qualname__}"
    return next((name for name, entry in _BACKENDS.items() if entry.target == target), None)


def create_backend(name: str, model: nn.Module, target: BackendTarget) -> ModelBackend:
    """Build backend ``name`` for ``model`` on ``target``. Raises BackendUnavailable when it cannot run
    there (saying why); building may take long (an export, a compilation) and fail in its own ways."""
    cls = backend_class(name)
    reason = cls.missing(target)
    if reason is not None:
        raise BackendUnavailable(f"{name}: {reason}")
    return cls(model, target)


register_backend(
    "eager", "server.backends.eager:EagerBackend", "the PyTorch module as it is; no start-up cost"
)
register_backend(
    "compile",
    "server.backends.compiled:CompiledBackend",
    "torch.compile, one graph per batch bucket; minutes at the first start, its kernels cached for the next",
)
register_backend(
    "onnxruntime",
    "server.backends.onnx:OnnxRuntimeBackend",
    "the model exported to ONNX once (cached) and run by ONNX Runtime; needs the onnx extra, float32 only",
)
