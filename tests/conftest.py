"""Fixtures shared by every test folder."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch):
    """Set environment variables for one test; any CBAM_* variable from the outer shell is removed first."""
    for name in list(os.environ):
        if name.startswith("CBAM_"):
            monkeypatch.delenv(name)

    class _Env:
        def set(self, name: str, value: str) -> None:
            monkeypatch.setenv(name, value)

    return _Env()


@pytest.fixture(scope="module")
def otlp_sink():
    """A real OTLP trace receiver on loopback (loadtest/otlp_sink.py) for one test module's servers."""
    from loadtest.otlp_sink import OtlpSink  # needs the tracing extra

    with OtlpSink() as sink:
        yield sink
