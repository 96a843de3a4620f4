"""nginx from deploy/nginx/nginx.conf.template in front of two real replicas on loopback: calls are
spread per call, and when one replica dies mid-run, no call is lost and the survivor takes over.

nginx alone cannot save the calls in flight on the replica that dies (it streams gRPC bodies, so it
cannot replay them); it answers them UNAVAILABLE, and the client's retries re-send them. Without
those retries this test fails.
"""

from __future__ import annotations

import functools
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from deploy_support import nginx_renderer

from client import Client, RetryPolicy
from server.launcher import ServerProcess, metric
from tests.loadtest.locust_run import bounded_run, run_distributed, stats
from tests.support import free_port, wait_for

pytestmark = pytest.mark.slow

FAIR_CALLS = 60
FAILOVER_CALLS = 80
CONCURRENCY = 4
PACE_S = 0.02


def _classify_ok(replica: ServerProcess) -> float:
    """Classify calls a replica answered OK, from its own /metrics."""
    return metric(replica.metrics_url, "cbam_requests_total", method="Classify", code="OK")


@pytest.fixture(scope="module")
def replicas():
    with ServerProcess() as first, ServerProcess() as second:
        yield first, second


@dataclass
class Balancer:
    address: str
    error_log: Path


def _passes_calls_or_exited(process: subprocess.Popen, client: Client) -> bool:
    return process.poll() is not None or client.health("cbam.v1.InferenceService") == "SERVING"


@pytest.fixture(scope="module")
def balancer(require_binary, processes, replicas, tmp_path_factory) -> Balancer:
    """nginx in front of both replicas."""
    nginx = require_binary("nginx")
    prefix = tmp_path_factory.mktemp("nginx")
    (prefix / "tmp").mkdir()
    for _attempt in range(3):  # the free port can be taken between choosing and binding it
        address = f"127.0.0.1:{free_port()}"
        config = prefix / "nginx.conf"
        config.write_text(
            nginx_renderer().render_for_prefix(prefix, listen=address, backends=[r.address for r in replicas])
        )
        error_log = prefix / "error.log"
        argv = [nginx, "-p", str(prefix), "-c", str(config), "-e", str(error_log), "-g", "daemon off;"]
        process = processes.start("nginx", argv)
        with Client(address, timeout=10, retry=RetryPolicy.none()) as client:
            try:
                ready = functools.partial(_passes_calls_or_exited, process, client)
                wait_for(ready, what="nginx to pass calls on", timeout_s=120)
            except pytest.fail.Exception:
                pytest.fail(f"nginx did not pass calls on within 120 s:\n{error_log.read_text()}")
        if process.poll() is None:
            return Balancer(address, error_log)
        if "Address already in use" not in error_log.read_text():
            pytest.fail(f"nginx exited with {process.returncode}:\n{error_log.read_text()}")
    pytest.fail("nginx found no free port in 3 tries")


def test_calls_are_spread_over_both_replicas(balancer, replicas, sample_png):
    before = [_classify_ok(r) for r in replicas]
    # One client, hence one HTTP/2 connection to nginx: an L4 balancer would pin it to one replica.
    # One call at a time: least_conn then finds both replicas idle at every pick and alternates, so
    # the split says how nginx balances, not which replica this machine happened to run faster.
    with Client(balancer.address, timeout=30) as client:
        predictions = [client.classify(sample_png) for _ in range(FAIR_CALLS)]
    assert len(predictions) == FAIR_CALLS
    served = [_classify_ok(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) == FAIR_CALLS, served
    assert min(served) >= 0.3 * FAIR_CALLS, f"unfair split between the replicas: {served}"


def test_distributed_locust_through_the_balancer_reaches_both_replicas(balancer, replicas, tmp_path):
    """Issue 7 §4: one Locust master and two workers against the balanced endpoint."""
    before = [_classify_ok(r) for r in replicas]
    log = run_distributed(balancer.address, tmp_path, *bounded_run(200))
    assert "2 workers connected" in log
    rows = stats(tmp_path / "dist")
    sent = int(rows["Classify"]["Request Count"])
    assert sent > 0 and int(rows["Aggregated"]["Failure Count"]) == 0
    served = [_classify_ok(r) - b for r, b in zip(replicas, before, strict=True)]
    assert sum(served) >= sent, served
    assert min(served) > 0, f"one replica got no Locust traffic through nginx: {served}"


def test_a_replica_dies_mid_run_and_no_call_is_lost(balancer, replicas, sample_png):
    doomed, survivor = replicas
    survivor_before = _classify_ok(survivor)
    done = 0
    done_lock = threading.Lock()
    killed = threading.Event()
    after_kill = 0

    retry = RetryPolicy(max_attempts=5, initial_backoff_seconds=0.05, max_backoff_seconds=0.5)
    with Client(balancer.address, timeout=30, retry=retry) as client:

        def call(_: int) -> None:
            nonlocal done, after_kill
            time.sleep(PACE_S)  # spread the run out, so the crash lands in the middle of it
            started_after_kill = killed.is_set()
            client.classify(sample_png)  # raises if the retries did not save the call
            with done_lock:
                done += 1
                after_kill += started_after_kill

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            results = [pool.submit(call, i) for i in range(FAILOVER_CALLS)]
            wait_for(lambda: done >= FAILOVER_CALLS // 4, timeout_s=300, what="the run to get going")
            doomed.stop(signal.SIGKILL)  # a crash: no drain, connections just vanish
            killed.set()
            for result in results:
                result.result()  # every call succeeded

    assert done == FAILOVER_CALLS
    # The crash hit traffic: nginx saw the dead replica fail and took it out.
    assert f'upstream: "grpc://{doomed.address}"' in balancer.error_log.read_text()
    assert after_kill >= FAILOVER_CALLS // 4, "the replica died too late to test anything"
    # Every call started after the crash was answered by the survivor (a call nginx replayed may
    # have been counted by the dead replica too, so the survivor's share is a lower bound).
    assert _classify_ok(survivor) - survivor_before >= after_kill
