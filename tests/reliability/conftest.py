"""Fixtures of the reliability tests: a real cbam-serve with a small message limit, shared by them all."""

from __future__ import annotations

import pytest

from server.launcher import ServerProcess
from tests.reliability.probes import MAX_MESSAGE_BYTES


@pytest.fixture(scope="session")
def server():
    """The default model behind a real server whose message limit is MAX_MESSAGE_BYTES (the hostile
    corpus is built around it), shared by the reliability tests that only call it."""
    with ServerProcess("--limits.max_message_bytes", str(MAX_MESSAGE_BYTES)) as s:
        yield s
