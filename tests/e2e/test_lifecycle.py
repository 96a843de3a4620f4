"""Start-up, health, SIGTERM with requests in flight, and refusals of bad settings: the real process."""

from __future__ import annotations

import json
import os
import signal
import urllib.request

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from server.launcher import ServerProcess, metric, run_to_exit
from tests.support import wait_for


def test_serving_line_and_health(served) -> None:
    (serving,) = served.events_named("serving")
    assert serving["port"] == served.port and serving["metrics_port"] == served.metrics_port
    assert serving["torch_threads"] == len(os.sched_getaffinity(0)) and serving["torch_interop_threads"] == 1
    with grpc.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "cbam.v1.InferenceService"):
            response = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert response.status == health_pb2.HealthCheckResponse.SERVING
    assert b"cbam_requests_total" in urllib.request.urlopen(served.metrics_url, timeout=10).read()


def _inflight(url: str) -> float:
    return metric(url, "cbam_inflight_requests")


@pytest.mark.slow
def test_sigterm_answers_everything_in_flight_and_exits_0(samples) -> None:
    n = 150
    # One image per forward; a grace period long enough for 150 forwards on a slow, busy machine.
    args = ("--batching.max_batch_size", "1", "--batching.max_batch_delay_ms", "0", "--grace_seconds", "300")
    with ServerProcess(*args) as server, grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        calls = [
            stub.Classify.future(pb.ClassifyRequest(encoded=samples[i % 20][0]), timeout=60) for i in range(n)
        ]
        # Wait until the server has taken every call (one image per forward: most are still queued).
        # (How many are still in flight then depends on the machine's speed; the wait needs some.)
        wait_for(
            lambda: (got := _inflight(server.metrics_url)) + sum(c.done() for c in calls) >= n and got,
            what=f"the server to take all {n} calls, some still in flight",
        )
        assert server.stop(signal.SIGTERM, timeout=300) == 0
        results = [call.result() for call in calls]
    assert len(results) == n and all(r.labels for r in results)
    events = [e["event"] for e in server.events]
    assert events.index("draining") < events.index("stopped")
    assert "Traceback" not in server.output


@pytest.mark.slow
def test_sigint_on_an_idle_server_exits_0() -> None:
    with ServerProcess() as server:
        assert server.stop(signal.SIGINT, timeout=300) == 0


@pytest.mark.slow
def test_settings_from_file_env_and_flags_reach_the_server(tmp_path) -> None:
    config = tmp_path / "cbam.yaml"
    config.write_text("batching:\n  max_batch_size: 3\n  max_queue: 7\n  max_batch_delay_ms: 1\n")
    with (
        ServerProcess(
            "--config",
            str(config),
            "--batching.max_batch_delay_ms",
            "4",
            env={"CBAM_BATCHING__MAX_QUEUE": "8"},
        ) as server,
        grpc.insecure_channel(server.address) as channel,
    ):
        info = inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=10
        )
    assert (info.batching.max_batch_size, info.batching.max_batch_delay_ms, info.batching.max_queue) == (
        3,
        4.0,
        8,
    )


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--batching.max_batch_size", "-4"), "batching.max_batch_size"),
        (("--model.device", "quantum"), "model.device"),
        (("--checkpoint", "/no/such/model.safetensors"), "model.checkpoint"),
        (("--model.dtype", "float16", "--model.device", "cpu"), "model.dtype"),
    ],
)
def test_bad_settings_stop_the_start_with_exit_2_naming_the_field(args: tuple[str, ...], field: str) -> None:
    result = run_to_exit(*args)
    assert result.returncode == 2, result.output
    assert field in result.output and "Traceback" not in result.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_cuda_is_refused() -> None:
    result = run_to_exit("--model.device", "cuda")
    assert result.returncode == 2 and "model.device" in result.output and "Traceback" not in result.output


def test_serving_line_is_json(served) -> None:
    line = next(line for line in served.lines if '"serving"' in line)
    assert json.loads(line)["level"] == "INFO"


@pytest.mark.slow
def test_ports_in_use_are_refused_naming_the_field(served) -> None:
    grpc_busy = run_to_exit("--port", str(served.port))
    assert grpc_busy.returncode == 2 and "port" in grpc_busy.output and "Traceback" not in grpc_busy.output
    metrics_busy = run_to_exit("--metrics-port", str(served.metrics_port))
    assert metrics_busy.returncode == 2 and "metrics.port" in metrics_busy.output
    assert "Traceback" not in metrics_busy.output
