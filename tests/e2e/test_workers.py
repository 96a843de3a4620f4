"""cbam-serve --workers 2: one port, two real worker processes under a real supervisor, on loopback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from client import Client
from server.launcher import ServerProcess, run_to_exit, scrape
from tests.support import free_port, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]  # servers of two workers each

RESTART_S = 300  # a worker loads and warms up again: on a busy 2-core machine, minutes
CONNECTIONS = 24  # the chance that all of them land on one of two workers is 2**-23


@pytest.fixture(scope="module")
def pair() -> Iterator[ServerProcess]:
    with ServerProcess("--workers", "2") as server:
        yield server


def _per_worker(url: str, name: str, **labels: str) -> dict[str, float]:
    """worker label -> the sample ``name`` with ``labels`` (plus worker) on the supervisor's /metrics."""
    found: dict[str, float] = {}
    for (sample, sample_labels), value in scrape(url).items():
        got = dict(sample_labels)
        worker = got.pop("worker", None)
        if sample == name and worker is not None and got == labels:
            found[worker] = value
    return found


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    # A zombie (exited, not yet reaped by whoever adopted it) has exited all the same.
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_serving_is_logged_once_every_worker_is_warm(pair) -> None:
    (serving,) = pair.events_named("serving")
    assert serving["workers"] == 2 and len(set(serving["pids"])) == 2
    assert serving["port"] == pair.port
    warm = pair.events_named("warmed up")
    assert sorted(e["worker"] for e in warm) == [0, 1] and {e["port"] for e in warm} == {pair.port}
    cores = len(os.sched_getaffinity(0))
    assert {e["torch_threads"] for e in warm} == {max(1, cores // 2)}
    with grpc.insecure_channel(pair.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cbam.v1.InferenceService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_model_info_lists_every_worker(pair) -> None:
    (serving,) = pair.events_named("serving")
    with Client(pair.address) as client:
        info = client.model_info()
    assert [w.index for w in info.workers] == [0, 1]
    assert [w.pid for w in info.workers] == serving["pids"]
    assert all(w.ready and w.restarts == 0 for w in info.workers) and info.worker in (0, 1)


def test_cbam_client_info_shows_the_workers(pair, capsys) -> None:
    from client.cli import main

    assert main(["info", "--target", pair.address]) == 0
    assert "workers" in capsys.readouterr().out
    assert main(["info", "--json", "--target", pair.address]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert [w["index"] for w in shown["workers"]] == [0, 1] and shown["worker"] in (0, 1)


def test_one_connection_stays_with_one_worker(pair) -> None:
    with Client(pair.address) as client:
        answered_by = {client.model_info().worker for _ in range(10)}
    assert len(answered_by) == 1


def test_one_client_with_several_connections_reaches_every_worker(pair, samples) -> None:
    before = _per_worker(pair.metrics_url, "cbam_requests_total", method="Classify", code="OK")
    with Client(pair.address, connections=CONNECTIONS) as client:
        answered_by = {client.model_info().worker for _ in range(CONNECTIONS)}
        for i in range(CONNECTIONS):
            client.classify(samples[i % len(samples)][0])
    assert answered_by == {0, 1}
    after = _per_worker(pair.metrics_url, "cbam_requests_total", method="Classify", code="OK")
    served = {w: after[w] - before.get(w, 0.0) for w in after}
    assert sum(served.values()) == CONNECTIONS and min(served.get(w, 0) for w in ("0", "1")) > 0, served


def test_one_metrics_endpoint_covers_every_worker_and_the_supervisor(pair) -> None:
    samples = scrape(pair.metrics_url)
    assert samples[("cbam_workers", frozenset({("state", "serving")}))] == 2
    assert samples[("cbam_workers", frozenset({("state", "down")}))] == 0
    for worker in ("0", "1"):
        assert samples[("cbam_worker_restarts_total", frozenset({("worker", worker)}))] == 0
        assert ("cbam_queue_depth", frozenset({("worker", worker)})) in samples
    infos = [labels for (name, labels) in samples if name == "cbam_model_info"]
    assert sorted(dict(labels)["worker"] for labels in infos) == ["0", "1"]


def test_a_second_server_on_the_workers_port_is_refused(pair) -> None:
    for workers in ("1", "2"):
        result = run_to_exit("--port", str(pair.port), "--workers", workers)
        assert result.returncode == 2, result.output
        assert "port: cannot listen" in result.output and "Traceback" not in result.output
        assert "worker started" not in result.output


def test_bad_flags_stop_the_start_before_any_worker() -> None:
    result = run_to_exit("--workers", "-1")
    assert result.returncode == 2 and "workers" in result.output and "Traceback" not in result.output
    busy = free_port()
    with _held(busy):
        result = run_to_exit("--workers", "2", "--metrics.host", "127.0.0.1", "--metrics-port", str(busy))
    assert result.returncode == 2 and "metrics.port" in result.output
    assert "worker started" not in result.output


def test_a_model_that_cannot_load_stops_the_start_with_one_message() -> None:
    # Only worker 0 starts until its model has loaded: one refusal, not one per worker.
    result = run_to_exit("--workers", "2", "--model.arch", "no_such_arch")
    assert result.returncode == 2, result.output
    assert result.output.count("cbam-serve: model.arch") == 1 and "Traceback" not in result.output
    started = [json.loads(line) for line in result.output.splitlines() if '"worker started"' in line]
    assert [e["worker"] for e in started] == [0]


@contextlib.contextmanager
def _held(port: int) -> Iterator[None]:
    """``port`` held by a listening socket that is not cbam-serve's."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield


def test_a_dead_worker_is_restarted_and_a_crash_loop_stops_the_server() -> None:
    with ServerProcess("--workers", "2") as server:
        with grpc.insecure_channel(server.address) as channel:
            stub = inference_pb2_grpc.InferenceServiceStub(channel)
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            survivor = info.worker
            victim = info.workers[1 - survivor]
            # Health over the survivor's connection: every worker's state counts, not only its own.
            seen: list[int] = []
            done = threading.Event()
            health = health_pb2_grpc.HealthStub(channel)
            watcher = threading.Thread(target=_watch_on, args=(health, seen, done), daemon=True)
            watcher.start()
            wait_for(lambda: seen, timeout_s=120, what="the first health answer")
            os.kill(victim.pid, signal.SIGKILL)
            died = wait_for(lambda: server.events_named("worker died"), timeout_s=120, what="a logged death")
            assert died[0]["worker"] == victim.index and died[0]["signal"] == "SIGKILL"
            not_serving = health_pb2.HealthCheckResponse.NOT_SERVING
            wait_for(lambda: not_serving in seen, timeout_s=120, what="NOT_SERVING")
            wait_for(
                lambda: seen[-1] == health_pb2.HealthCheckResponse.SERVING
                and health_pb2.HealthCheckResponse.NOT_SERVING in seen,
                timeout_s=RESTART_S,
                what="SERVING again",
            )
            done.set()
            info = stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10)
            restarted = info.workers[victim.index]
            assert restarted.pid != victim.pid and restarted.ready and restarted.restarts == 1
        restarts = _per_worker(server.metrics_url, "cbam_worker_restarts_total")
        assert restarts == {str(victim.index): 1.0, str(survivor): 0.0}

        # Now kill it each time it comes back: the supervisor gives up instead of looping for ever.
        killed = {victim.pid}
        deadline = time.monotonic() + 600  # restarts load the model: minutes on a busy machine
        while server.process.poll() is None:
            assert time.monotonic() < deadline and len(killed) < 20, "no end to the crash loop"
            for event in server.events_named("worker started"):
                if event["worker"] == victim.index and event["pid"] not in killed:
                    killed.add(event["pid"])
                    os.kill(event["pid"], signal.SIGKILL)
            time.sleep(0.02)
        assert server.process.returncode == 1
        assert server.events_named("worker crash loop: stopping the server")
        assert server.events_named("stopped")
        (serving,) = server.events_named("serving")
        for pid in {*serving["pids"], *killed}:
            wait_for(lambda pid=pid: _pid_gone(pid), timeout_s=120, what=f"worker {pid} to exit")


def _watch_on(health, seen: list[int], stop: threading.Event) -> None:
    try:
        for answer in health.Watch(health_pb2.HealthCheckRequest(), timeout=900):
            seen.append(answer.status)
            if stop.is_set():
                return
    except grpc.RpcError:  # the channel closed under it at the end of the test
        pass


def test_killing_the_supervisor_leaves_no_worker_behind() -> None:
    with ServerProcess("--workers", "2") as server:
        (serving,) = server.events_named("serving")
        server.process.kill()
        server.process.wait(30)
        for pid in serving["pids"]:
            wait_for(lambda pid=pid: _pid_gone(pid), timeout_s=120, what=f"worker {pid} to exit")
