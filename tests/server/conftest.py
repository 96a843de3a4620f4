"""Pieces of the in-process server tests (make_server and connect are in tests/conftest.py)."""

from __future__ import annotations

import asyncio
import io
import threading
from collections.abc import Awaitable
from typing import TypeVar

import numpy as np
import pytest
from PIL import Image

from server.app import InferenceServer
from server.runner import ModelRunner

T = TypeVar("T")


def png(seed: int = 0, size: tuple[int, int] = (32, 32)) -> bytes:
    """A small RGB test picture, as PNG bytes."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Gate:
    """Holds every forward pass (after ``close()``) until ``release()``; counts what was computed."""

    def __init__(self) -> None:
        self._open = threading.Event()
        self._open.set()
        self._entered = threading.Event()
        self.closed = False
        self.computed: list[int] = []  # batch sizes (images) computed while the gate was in use

    def close(self) -> None:
        self._open.clear()
        self._entered.clear()
        self.closed = True

    def release(self) -> None:
        self._open.set()

    async def wait_entered(self, timeout: float = 60.0) -> None:
        assert await asyncio.to_thread(self._entered.wait, timeout), "no forward pass started"

    async def hold(self, call: Awaitable[T]) -> asyncio.Future[T]:
        """Close the gate, start ``call`` and return it once its forward pass is held at the gate."""
        self.close()
        held = asyncio.ensure_future(call)
        await self.wait_entered()
        return held

    def _pass(self, size: int) -> None:
        if self.closed:
            self.computed.append(size)
            self._entered.set()
            assert self._open.wait(120), "gate never released"


@pytest.fixture
def gate(monkeypatch: pytest.MonkeyPatch):
    g = Gate()
    original = ModelRunner.run_batch

    def gated(runner: ModelRunner, items):
        g._pass(sum(item.count for item in items))  # images: a chunk counts all of its own
        return original(runner, items)

    monkeypatch.setattr(ModelRunner, "run_batch", gated)
    yield g
    g.release()


def sample(server: InferenceServer, name: str, **labels: str) -> float:
    value = server.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value
