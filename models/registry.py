"""Model registry: builders registered by name, ``create_model(name, **kwargs)`` is the single door.

Each builder records the input size (H, W) it is meant for, so a caller can size an input, or list
the models, from the name alone.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from torch import nn

__all__ = ["register_model", "create_model", "list_models", "default_input_size"]

_Builder = TypeVar("_Builder", bound=Callable[..., nn.Module])

_BUILDERS: dict[str, Callable[..., nn.Module]] = {}
_INPUT_SIZES: dict[str, tuple[int, int]] = {}


def register_model(fn: _Builder | None = None, *, input_size: tuple[int, int] = (224, 224)):
    """Register a builder under its function name; use bare or as ``@register_model(input_size=(32, 32))``.

    A name registered twice is refused with ``ValueError``.
    """
    if len(input_size) != 2 or any(int(s) != s or s < 1 for s in input_size):
        raise ValueError(f"input_size should be two positive ints (H, W), got {input_size!r}")

    def register(builder: _Builder) -> _Builder:
        name = builder.__name__
        if name in _BUILDERS:
            raise ValueError(f"model {name!r} is already registered")
        _BUILDERS[name] = builder
        _INPUT_SIZES[name] = (int(input_size[0]), int(input_size[1]))
        return builder

    return register if fn is None else register(fn)


def _check_known(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {sorted(_BUILDERS)}")


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered model ``name`` (train mode, like torchvision), passing ``kwargs`` on."""
    _check_known(name)
    return _BUILDERS[name](**kwargs)


def list_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(_BUILDERS)


def default_input_size(name: str) -> tuple[int, int]:
    """The (H, W) input size the model ``name`` was registered with."""
    _check_known(name)
    return _INPUT_SIZES[name]
