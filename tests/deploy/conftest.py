"""Fixtures for the deployment tests: real binaries (Prometheus, nginx) and processes that are always
stopped."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator

import pytest
from deploy_support import Processes, install_debian_package

from models import SAMPLES_DIR

# The Debian package that provides each binary the tests start; scripts/setup.sh --test installs them.
_APT_PACKAGES = {"prometheus": "prometheus", "promtool": "prometheus", "nginx": "nginx-light"}


@pytest.fixture(scope="session")
def require_binary() -> Callable[[str], str]:
    """Path of a binary the tests run; installs its Debian package when missing, skips only if that fails."""

    def find(name: str) -> str:
        path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
        if path is None:
            problem = install_debian_package(_APT_PACKAGES[name])
            path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin")
            if path is None:
                pytest.skip(
                    f"{name} is not installed and installing Debian package {_APT_PACKAGES[name]!r} "
                    f"did not bring it ({problem or 'no ' + name + ' on PATH'}); "
                    "run `bash scripts/setup.sh --test`"
                )
        return path

    return find


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> Iterator[Processes]:
    """Processes started by one test module, all stopped when it ends."""
    running = Processes(tmp_path_factory.mktemp("logs"))
    try:
        yield running
    finally:
        running.stop_all()


@pytest.fixture(scope="session")
def sample_png() -> bytes:
    """An image the default model classifies: one of its committed samples."""
    return sorted(SAMPLES_DIR.glob("*.png"))[0].read_bytes()
