"""Helpers every test folder may use: where the repository is, free ports, and waiting for conditions.

A test never sleeps a fixed time and then asserts: it waits for the condition (or for a value to stop
changing) under a timeout generous enough for a slow, busy machine, and fails saying what it waited for.
The cbam-serve child process and /metrics readers live in server/launcher.py (cbam-bench and
scripts/soak.py use them too).
"""

from __future__ import annotations

import asyncio
import inspect
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

__all__ = ["ROOT", "eventually", "free_port", "steady", "wait_for"]

ROOT = Path(__file__).resolve().parents[1]

T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on now (bound, then released: good enough on loopback)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def wait_for(
    condition: Callable[[], T], *, what: str, timeout_s: float = 60.0, interval_s: float = 0.05
) -> T:
    """Poll ``condition`` until it returns something truthy, and return that; fail after ``timeout_s``.
    An exception from ``condition`` counts as not yet (the thing polled may not be up)."""
    deadline = time.monotonic() + timeout_s
    last_error = "none"
    while True:
        try:
            result = condition()
        except Exception as exc:
            last_error = repr(exc)  # not the exception: its frames would keep what it left open alive
        else:
            if result:
                return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; last error: {last_error}")
        time.sleep(interval_s)


async def eventually(
    condition: Callable[[], object], *, what: str = "the condition", timeout_s: float = 60.0
) -> None:
    """Wait, without blocking the event loop, until ``condition()`` is true; fail after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}")
        await asyncio.sleep(0.005)


async def steady(
    read: Callable[[], T] | Callable[[], Awaitable[T]],
    *,
    what: str,
    quiet_s: float = 3.0,
    timeout_s: float = 120.0,
    interval_s: float = 0.1,
) -> T:
    """The value ``read()`` settles at: once it has not changed for ``quiet_s``; fail if it is still
    changing after ``timeout_s``. ``read`` may be a plain or an async function; the event loop runs
    while this waits."""

    async def value() -> T:
        got = read()
        return await got if inspect.isawaitable(got) else got

    deadline = time.monotonic() + timeout_s
    last, since = await value(), time.monotonic()
    while time.monotonic() - since < quiet_s:
        if time.monotonic() > deadline:
            pytest.fail(f"{what} still changing after {timeout_s:.0f} s (last {last!r})")
        await asyncio.sleep(interval_s)
        now = await value()
        if now != last:
            last, since = now, time.monotonic()
    return last
