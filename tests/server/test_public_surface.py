"""Each server module says what it offers in __all__, and offers nothing by accident."""

from __future__ import annotations

import importlib
import inspect

import pytest

MODULES = [
    "app", "assembly", "auth", "batcher", "config", "errors", "gpu", "interceptors", "launcher", "loading",
    "logs", "metrics", "pipeline", "postprocess", "preprocess", "runner", "service", "supervisor", "tracing",
    "tuning", "worker", "__main__", "backends", "backends.auto", "backends.base", "backends.cache",
    "backends.compiled", "backends.eager", "backends.onnx",
]  # fmt: skip


@pytest.mark.parametrize("name", MODULES)
def test_all_lists_exactly_the_public_classes_and_functions_defined_here(name: str) -> None:
    module = importlib.import_module(f"server.{name}")
    exported = set(module.__all__)
    assert all(hasattr(module, n) for n in exported), sorted(n for n in exported if not hasattr(module, n))
    defined = {
        n
        for n, obj in vars(module).items()
        if not n.startswith("_")
        and (inspect.isclass(obj) or inspect.isfunction(obj))
        and obj.__module__ == module.__name__
    }
    assert defined <= exported, f"public but not in __all__: {sorted(defined - exported)}"
