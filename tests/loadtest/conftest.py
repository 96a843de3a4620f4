"""A real cbam-serve shared by the load-test tests."""

from __future__ import annotations

import pytest

from tests.support import ServerProcess


@pytest.fixture(scope="session")
def live():
    with ServerProcess() as server:
        yield server
