"""deploy/grpc_health_check.py, the container health check, against a real server."""

from __future__ import annotations

import subprocess
import sys

import pytest
from deploy_support import REPO

from server.launcher import child_env
from tests.support import free_port

SCRIPT = REPO / "deploy/grpc_health_check.py"


def _check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--timeout", "5", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(env),
    )


@pytest.mark.parametrize("service", ["cbam.v1.InferenceService", ""])
def test_healthy_server_passes(live, service):
    done = _check("--address", live.address, "--service", service)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SERVING" in done.stdout


def test_default_address_follows_cbam_port(live):
    # The image runs the script with no arguments; CBAM_PORT moves the server and the check together.
    done = _check(env={"CBAM_PORT": str(live.port)})
    assert done.returncode == 0, done.stdout + done.stderr


def test_unknown_service_fails(live):
    done = _check("--address", live.address, "--service", "no.such.Service")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stdout


def test_nothing_listening_fails():
    done = _check("--address", f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stdout
