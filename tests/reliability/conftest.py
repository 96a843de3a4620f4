"""Fixtures of the reliability tests: a real cbam-serve (tests/support.py), shared by a test module."""

from __future__ import annotations

import pytest

from tests.reliability.probes import MAX_MESSAGE_BYTES
from tests.support import ServerProcess


@pytest.fixture(scope="module")
def server():
    """The default model behind a real server, shared by one test module."""
    with ServerProcess("--limits.max_message_bytes", str(MAX_MESSAGE_BYTES)) as s:
        yield s
