"""Shared pieces of the security tests: a throw-away PKI and in-process servers on loopback."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from server.app import InferenceServer, build_server
from server.config import load_settings
from tests.security.certs import Pki, make_pki

MakeServer = Callable[..., Awaitable[InferenceServer]]


@pytest.fixture(autouse=True)
def _no_outer_cbam_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    # A CBAM_* variable in the developer's shell must not change what these tests see.
    for name in list(os.environ):
        if name.startswith("CBAM_"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
async def make_server() -> AsyncIterator[MakeServer]:
    """Build and start in-process servers (default model, 127.0.0.1, port 0, no /metrics)."""
    servers: list[InferenceServer] = []

    async def make(*argv: str) -> InferenceServer:
        base = ["--host", "127.0.0.1", "--port", "0", "--metrics.enabled", "false"]
        server, _ = build_server(load_settings([*base, *argv]))
        servers.append(server)
        await server.start()
        return server

    yield make
    for server in servers:
        await server.stop(0)
