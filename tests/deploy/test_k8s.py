"""deploy/k8s: kinds, labels that match selectors, ports that match the server's configuration,
probes through the gRPC health service, a grace period longer than the drain, a GPU per pod."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_support import REPO, load_yaml_documents

from client import Client
from server.config import Settings
from server.launcher import ServerProcess

K8S = REPO / "deploy/k8s"
KUSTOMIZATION = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
RESOURCES = [doc for name in KUSTOMIZATION["resources"] for doc in load_yaml_documents(K8S / name)]


def _one(kind: str, name: str | None = None) -> dict:
    found = [r for r in RESOURCES if r["kind"] == kind and (name is None or r["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


DEPLOYMENT = _one("Deployment")
POD = DEPLOYMENT["spec"]["template"]
POD_LABELS = POD["metadata"]["labels"]
(CONTAINER,) = POD["spec"]["containers"]
PORTS = {p["name"]: p["containerPort"] for p in CONTAINER["ports"]}


def _server_config() -> dict:
    """The settings file the pod reads: the ConfigMap key mounted where --config points."""
    config_path = CONTAINER["args"][CONTAINER["args"].index("--config") + 1]
    mount = next(m for m in CONTAINER["volumeMounts"] if config_path.startswith(m["mountPath"] + "/"))
    volume = next(v for v in POD["spec"]["volumes"] if v["name"] == mount["name"])
    config_map = _one("ConfigMap", volume["configMap"]["name"])
    key = config_path.removeprefix(mount["mountPath"] + "/")
    assert key in config_map["data"], f"--config {config_path}: ConfigMap has no key {key!r}"
    return yaml.safe_load(config_map["data"][key])


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_kustomization_lists_every_manifest():
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(KUSTOMIZATION["resources"]) == manifests
    kinds = sorted(r["kind"] for r in RESOURCES)
    assert kinds == sorted(
        [
            "ConfigMap",
            "Deployment",
            "HorizontalPodAutoscaler",
            "PodDisruptionBudget",
            "PodMonitor",
            "Service",
            "Service",
        ]
    )


def test_the_configmap_is_valid_server_settings(env):
    settings = Settings(**_server_config())
    assert settings.model.device.startswith("cuda"), "one replica per GPU: the ConfigMap should serve on CUDA"


def test_container_ports_are_the_configured_ones():
    config = _server_config()
    defaults = Settings.model_construct()
    configured = {
        "grpc": config.get("port", defaults.port),
        "metrics": config.get("metrics", {}).get("port", defaults.metrics.port),
    }
    assert configured == PORTS
    # The documented defaults (gRPC 50051, metrics 8000), as docker-compose and the Dockerfile use.
    assert configured == {"grpc": defaults.port, "metrics": defaults.metrics.port}


def test_selectors_match_the_pod_labels():
    assert _selects(DEPLOYMENT["spec"]["selector"]["matchLabels"], POD_LABELS)
    for kind in ("Service", "PodMonitor", "PodDisruptionBudget"):
        for resource in (r for r in RESOURCES if r["kind"] == kind):
            selector = resource["spec"]["selector"]
            selector = selector.get("matchLabels", selector)
            assert selector and _selects(selector, POD_LABELS), f"{kind} {resource['metadata']['name']}"


def test_a_headless_service_for_client_balancing_and_a_normal_one_for_proxies():
    services = {s["metadata"]["name"]: s["spec"] for s in RESOURCES if s["kind"] == "Service"}
    headless = [name for name, spec in services.items() if spec.get("clusterIP") == "None"]
    normal = [name for name, spec in services.items() if spec.get("clusterIP") != "None"]
    assert len(headless) == 1 and len(normal) == 1, services
    assert services[headless[0]].get("publishNotReadyAddresses", False) is False  # draining pods drop out
    for spec in services.values():
        for port in spec["ports"]:
            assert port["targetPort"] in PORTS, f"targetPort {port['targetPort']} is no container port"
            assert port["port"] == PORTS[port["targetPort"]]
    assert {p["targetPort"] for p in services[normal[0]]["ports"]} == {"grpc", "metrics"}
    assert {p["targetPort"] for p in services[headless[0]]["ports"]} == {"grpc"}


@pytest.mark.parametrize("probe", ["startupProbe", "readinessProbe", "livenessProbe"])
def test_probes_ask_the_grpc_health_service(probe):
    spec = CONTAINER[probe]
    assert set(spec) & {"grpc", "httpGet", "tcpSocket", "exec"} == {"grpc"}, f"{probe} is not a grpc probe"
    assert spec["grpc"]["port"] == PORTS["grpc"]
    # The names the server registers with grpc.health.v1 (docs/ARCHITECTURE.md).
    assert spec["grpc"].get("service", "") in ("", "cbam.v1.InferenceService")
    if probe == "readinessProbe":
        assert spec["grpc"]["service"] == "cbam.v1.InferenceService"


def test_the_grace_period_outlasts_pre_stop_and_the_drain():
    grace_seconds = _server_config().get("grace_seconds", Settings.model_construct().grace_seconds)
    command = CONTAINER["lifecycle"]["preStop"]["exec"]["command"]
    pre_stop = float(command[1]) if command[0] == "sleep" else 0.0
    termination = POD["spec"]["terminationGracePeriodSeconds"]
    assert termination > pre_stop + grace_seconds, (
        f"{termination}s <= preStop {pre_stop}s + drain {grace_seconds}s"
    )


def test_one_gpu_per_pod_and_the_image_user():
    resources = CONTAINER["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 1
    assert resources["requests"].get("nvidia.com/gpu", 1) == 1  # extended resources: requests == limits
    assert {"cpu", "memory"} <= set(resources["requests"])
    security = POD["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True
    dockerfile = (REPO / "deploy/Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"--uid {security['runAsUser']}\b", dockerfile), "runAsUser is not the image's user"
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
    assert CONTAINER["image"] == compose["services"]["cbam-serve-gpu"]["image"]


def test_pod_monitor_scrapes_metrics_as_the_job_the_rules_expect():
    monitor = _one("PodMonitor")["spec"]
    (endpoint,) = monitor["podMetricsEndpoints"]
    assert endpoint["port"] in PORTS and endpoint["port"] == "metrics"
    assert endpoint["path"] == "/metrics"
    job = POD_LABELS[monitor["jobLabel"]]
    rules = (REPO / "deploy/prometheus/rules/cbam-serve.yml").read_text(encoding="utf-8")
    assert f'job="{job}"' in rules, f"the alerts select a job other than {job!r}"


def test_hpa_scales_the_deployment_on_queue_depth():
    hpa = _one("HorizontalPodAutoscaler")["spec"]
    target = hpa["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == (
        DEPLOYMENT["apiVersion"],
        "Deployment",
        DEPLOYMENT["metadata"]["name"],
    )
    (metric,) = hpa["metrics"]
    assert metric["type"] == "Pods" and metric["pods"]["metric"]["name"] == "cbam_queue_depth"
    average = float(metric["pods"]["target"]["averageValue"])
    config = _server_config()
    assert 0 < average < config["batching"]["max_queue"], "scale long before the queue fills and sheds"
    assert hpa["minReplicas"] <= DEPLOYMENT["spec"]["replicas"] <= hpa["maxReplicas"]


@pytest.mark.slow
def test_the_server_starts_from_the_configmap(tmp_path):
    # As the pod runs it (`--config FILE`), on CPU: this machine has no GPU for device cuda / float16.
    config = tmp_path / "cbam-serve.yaml"
    config.write_text(yaml.safe_dump(_server_config()))
    cpu = {"CBAM_MODEL__DEVICE": "cpu", "CBAM_MODEL__DTYPE": "float32"}
    with (
        ServerProcess("--config", str(config), env=cpu) as server,
        Client(server.address, timeout=10) as client,
    ):
        info = client.model_info()
    assert info.batching.max_batch_size == _server_config()["batching"]["max_batch_size"]
    assert info.batching.max_queue == _server_config()["batching"]["max_queue"]
