"""deploy/kserve: a grpc-v2 ServingRuntime whose flags are the server's own, its h2c port the one the
server binds, probes through the gRPC health service, Prometheus annotations on the metrics port, and
InferenceServices that select it (the default model, and a mounted checkpoint)."""

from __future__ import annotations

import grpc
import pytest
import yaml
from deploy_support import REPO, load_yaml_documents
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.oip import grpc_service_pb2 as oip_pb
from cbam.oip import grpc_service_pb2_grpc
from server.config import Settings, load_settings
from server.launcher import ServerProcess
from server.protocols.oip import SERVICE_NAME

KSERVE = REPO / "deploy/kserve"
KUSTOMIZATION = yaml.safe_load((KSERVE / "kustomization.yaml").read_text(encoding="utf-8"))
RESOURCES = [doc for name in KUSTOMIZATION["resources"] for doc in load_yaml_documents(KSERVE / name)]
(RUNTIME,) = [r for r in RESOURCES if r["kind"] == "ServingRuntime"]
(CONTAINER,) = RUNTIME["spec"]["containers"]
SERVICES = {r["metadata"]["name"]: r for r in RESOURCES if r["kind"] == "InferenceService"}
ENV = {e["name"]: e["value"] for e in CONTAINER.get("env", [])}


def _settings(env, name: str, extra_env: dict[str, str] | None = None) -> Settings:
    """The server's settings in the pod of InferenceService ``name`` (KServe fills in {{.Name}})."""
    for key, value in {**ENV, **(extra_env or {})}.items():
        if key.startswith("CBAM_"):
            env.set(key, value)
    return load_settings([arg.replace("{{.Name}}", name) for arg in CONTAINER["args"]])


def test_kustomization_lists_every_manifest():
    assert set(KUSTOMIZATION["resources"]) == {p.name for p in KSERVE.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(r["kind"] for r in RESOURCES) == ["InferenceService", "InferenceService", "ServingRuntime"]
    assert set(SERVICES) == {"cbam-digits", "cbam-resnet50"}


def test_the_runtime_speaks_grpc_v2_on_the_servers_port(env):
    assert RUNTIME["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert RUNTIME["spec"]["protocolVersions"] == ["grpc-v2"]
    settings = _settings(env, "cbam-digits")
    (port,) = CONTAINER["ports"]
    assert port == {"name": "h2c", "containerPort": settings.port, "protocol": "TCP"}
    assert settings.oip.enabled and settings.oip.model_name == "cbam-digits"
    assert (settings.model.device, settings.model.dtype) == ("cuda", "float16")
    assert settings.host == Settings.model_construct().host  # every interface: KServe's proxy is another pod


def test_prometheus_annotations_point_at_the_metrics_endpoint(env):
    settings = _settings(env, "cbam-digits")
    annotations = RUNTIME["spec"]["annotations"]
    assert annotations["prometheus.kserve.io/port"] == str(settings.metrics.port)
    assert annotations["prometheus.kserve.io/path"] == "/metrics"
    assert settings.metrics.enabled and settings.metrics.host == "0.0.0.0"
    for service in SERVICES.values():
        assert service["metadata"]["annotations"]["serving.kserve.io/enable-prometheus-scraping"] == "true"


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_the_grpc_health_service(probe):
    spec = CONTAINER[probe]
    assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe} is not a grpc probe"
    assert spec["grpc"]["port"] == CONTAINER["ports"][0]["containerPort"]
    expected = "" if probe == "livenessProbe" else SERVICE_NAME  # ready = the OIP service is SERVING
    assert spec["grpc"]["service"] == expected


def test_one_gpu_per_pod_and_the_image_user():
    resources = CONTAINER["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == 1
    deployment = next(d for d in load_yaml_documents(REPO / "deploy/k8s/deployment.yaml"))
    (k8s_container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert CONTAINER["image"] == k8s_container["image"]
    user = deployment["spec"]["template"]["spec"]["securityContext"]["runAsUser"]
    assert CONTAINER["securityContext"]["runAsUser"] == user and CONTAINER["securityContext"]["runAsNonRoot"]


@pytest.mark.parametrize("name", ["cbam-digits", "cbam-resnet50"])
def test_each_inference_service_selects_the_runtime(name):
    model = SERVICES[name]["spec"]["predictor"]["model"]
    assert model["runtime"] == RUNTIME["metadata"]["name"]
    assert model["protocolVersion"] in RUNTIME["spec"]["protocolVersions"]
    formats = [(f["name"], f["version"]) for f in RUNTIME["spec"]["supportedModelFormats"]]
    assert (model["modelFormat"]["name"], model["modelFormat"]["version"]) in formats


def test_the_checkpoint_service_serves_the_file_kserve_mounts(env, tmp_path):
    model = SERVICES["cbam-resnet50"]["spec"]["predictor"]["model"]
    assert model["storageUri"].startswith(("pvc://", "s3://", "gs://", "https://"))
    checkpoint = {e["name"]: e["value"] for e in model["env"]}["CBAM_MODEL__CHECKPOINT"]
    # KServe's storage initializer copies storageUri to /mnt/models.
    assert checkpoint.startswith("/mnt/models/") and checkpoint.endswith(".safetensors")
    stand_in = tmp_path / checkpoint.removeprefix("/mnt/models/")  # the same setting, a file that exists
    stand_in.write_bytes(b"")
    settings = _settings(env, "cbam-resnet50", {"CBAM_MODEL__CHECKPOINT": str(stand_in)})
    assert settings.model.checkpoint == stand_in and settings.oip.model_name == "cbam-resnet50"
    assert "storageUri" not in SERVICES["cbam-digits"]["spec"]["predictor"]["model"]  # the embedded model


@pytest.mark.slow
def test_the_server_starts_from_the_runtimes_flags():
    # As the pod runs it, on CPU (no GPU here) and on free loopback ports instead of the fixed ones.
    args = [
        arg.replace("{{.Name}}", "cbam-digits")
        for arg in CONTAINER["args"]
        if not arg.startswith(("--port=", "--metrics.port="))
    ]
    cpu = {**ENV, "CBAM_MODEL__DEVICE": "cpu", "CBAM_MODEL__DTYPE": "float32"}
    with ServerProcess(*args, env=cpu) as server, grpc.insecure_channel(server.address) as channel:
        probe = CONTAINER["readinessProbe"]["grpc"]["service"]
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=probe))
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = grpc_service_pb2_grpc.GRPCInferenceServiceStub(channel)
        assert stub.ModelReady(oip_pb.ModelReadyRequest(name="cbam-digits"), timeout=10).ready
