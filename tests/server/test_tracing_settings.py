"""Tracing's settings and start: off by default, on with tracing.enabled or OpenTelemetry's endpoint
variables, and a server that needs no OpenTelemetry while it is off (server/config.py, server/tracing.py).
The spans themselves are checked end to end in tests/e2e/test_tracing.py."""

from __future__ import annotations

import sys

import grpc
import pytest
from pydantic import ValidationError

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc
from models import SAMPLES_DIR
from server.config import Settings, Tracing
from server.errors import StartupError
from server.interceptors import GRPC_CODE_NAMES
from server.launcher import ServerProcess, run_to_exit
from server.tracing import Tracing as ServerTracing

# Runs cbam-serve where OpenTelemetry cannot be imported, whatever the environment has installed.
WITHOUT_OPENTELEMETRY = (
    "-c",
    "import sys; sys.modules['opentelemetry'] = None; from server.__main__ import main; sys.exit(main())",
)


def test_tracing_is_off_by_default_and_needs_nothing(monkeypatch):
    assert Settings().tracing.enabled is False
    assert ServerTracing.start(Settings().tracing) is ServerTracing.OFF


@pytest.mark.parametrize("variable", ["OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"])
def test_an_otlp_endpoint_variable_turns_tracing_on_unless_settings_say_off(monkeypatch, variable):
    monkeypatch.setenv(variable, "http://collector:4317")
    assert Settings().tracing.enabled is True
    assert Settings(_cli_parse_args=["--tracing.enabled", "false"]).tracing.enabled is False
    monkeypatch.setenv("CBAM_TRACING__ENABLED", "false")
    assert Settings().tracing.enabled is False


def test_the_protocol_comes_from_settings_or_opentelemetrys_variables(monkeypatch):
    assert Tracing().protocol == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
    assert Tracing().protocol == "http/protobuf"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "grpc")  # the traces-only one wins
    assert Tracing().protocol == "grpc"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "http/json")
    with pytest.raises(ValidationError, match="OTEL_EXPORTER_OTLP_TRACES_PROTOCOL='http/json'"):
        Tracing()
    with pytest.raises(ValidationError, match="tracing.sample_ratio"):
        Settings(_cli_parse_args=["--tracing.sample_ratio", "1.5"])


def test_settings_win_over_opentelemetrys_variables(monkeypatch):
    monkeypatch.setenv("OTEL_SERVICE_NAME", "from-the-environment")
    named = ServerTracing.start(
        Tracing(enabled=True, service_name="from-settings", endpoint="http://127.0.0.1:9")
    )
    unnamed = ServerTracing.start(Tracing(enabled=True, endpoint="http://127.0.0.1:9"))
    monkeypatch.delenv("OTEL_SERVICE_NAME")
    default = ServerTracing.start(Tracing(enabled=True, endpoint="http://127.0.0.1:9", sample_ratio=0.25))
    try:
        assert named._provider.resource.attributes["service.name"] == "from-settings"
        assert unnamed._provider.resource.attributes["service.name"] == "from-the-environment"
        assert default._provider.resource.attributes["service.name"] == "cbam-serve"
        assert "0.25" in default._provider.sampler.get_description()
    finally:
        for tracing in (named, unnamed, default):
            tracing.shutdown()


def test_tracing_on_without_opentelemetry_is_refused_naming_the_setting(monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)
    with pytest.raises(StartupError, match=r"tracing\.enabled.*pip install 'cbam-serve\[tracing\]'"):
        ServerTracing.start(Tracing(enabled=True))


def test_the_server_runs_without_opentelemetry_while_tracing_is_off():
    class WithoutOpenTelemetry(ServerProcess):
        command = WITHOUT_OPENTELEMETRY

    image = sorted(SAMPLES_DIR.glob("*.png"))[0].read_bytes()
    with WithoutOpenTelemetry() as server, grpc.insecure_channel(server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)
        assert stub.Classify(pb.ClassifyRequest(encoded=image), timeout=30).labels


def test_the_server_refuses_to_start_with_tracing_on_and_no_opentelemetry():
    done = run_to_exit(
        "--metrics.enabled", "false", env={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9"},
        command=WITHOUT_OPENTELEMETRY,
    )  # fmt: skip
    assert done.returncode == 2, done.output
    assert "tracing.enabled" in done.output and "cbam-serve[tracing]" in done.output


def test_grpc_codes_are_named_as_go_grpc_prometheus_names_them():
    assert GRPC_CODE_NAMES[grpc.StatusCode.OK] == "OK"
    assert GRPC_CODE_NAMES[grpc.StatusCode.CANCELLED] == "Canceled"
    assert GRPC_CODE_NAMES[grpc.StatusCode.INVALID_ARGUMENT] == "InvalidArgument"
    assert GRPC_CODE_NAMES[grpc.StatusCode.UNAUTHENTICATED] == "Unauthenticated"
    assert len(set(GRPC_CODE_NAMES.values())) == len(grpc.StatusCode)
