"""Fixtures shared by every test folder."""

from __future__ import annotations

import json
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


@pytest.fixture(scope="session")
def samples() -> list[tuple[bytes, str]]:
    """The default model's sample digits: (PNG bytes, true label)."""
    from models import SAMPLES_DIR

    labels = json.loads((SAMPLES_DIR / "labels.json").read_text())
    return [((SAMPLES_DIR / name).read_bytes(), label) for name, label in sorted(labels.items())]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--require-cuda",
        action="store_true",
        help="fail, rather than skip, the tests marked cuda when no CUDA device is usable "
        "(scripts/gpu_check.sh runs them so)",
    )


@pytest.hookimpl(tryfirst=True)  # before fixtures start a GPU server for a test that cannot run
def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("cuda") is None:
        return
    import torch  # here, so that collecting the suite does not wait for torch

    if torch.cuda.is_available():
        return
    build = f"built for CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
    why = f"no CUDA device usable: torch {torch.__version__} ({build}) sees {torch.cuda.device_count()} GPUs"
    if item.config.getoption("--require-cuda"):
        pytest.fail(f"--require-cuda, but {why}", pytrace=False)
    pytest.skip(why)


@pytest.fixture(scope="module")
def otlp_sink():
    """A real OTLP trace receiver on loopback (loadtest/otlp_sink.py) for one test module's servers."""
    from loadtest.otlp_sink import OtlpSink  # needs the tracing extra

    with OtlpSink() as sink:
        yield sink
