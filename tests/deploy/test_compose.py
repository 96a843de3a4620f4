"""docker-compose.yml, checked without a Docker engine: its structure, that everything it builds or
mounts exists, that host ports don't clash, and that the services agree with each other and with
the server's configuration (ports, grace period, CBAM_* variables)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml
from deploy_support import REPO
from pydantic import BaseModel

from server.config import Settings

COMPOSE = yaml.safe_load((REPO / "docker-compose.yml").read_text(encoding="utf-8"))
SERVICES: dict[str, dict] = COMPOSE["services"]
SERVE = ("cbam-serve", "cbam-serve-gpu", "cbam-replica")  # the services that run cbam-serve
DEFAULTS = Settings.model_construct()  # the defaults, whatever CBAM_* variables are set


def _stages(dockerfile: str) -> dict[str, str]:
    """Build stages of a Dockerfile: name -> text of the stage."""
    text = (REPO / dockerfile).read_text(encoding="utf-8")
    parts = re.split(r"^FROM\s+\S+(?:\s+AS\s+(\S+))?\s*$", text, flags=re.MULTILINE | re.IGNORECASE)
    return {name: body for name, body in zip(parts[1::2], parts[2::2], strict=True) if name}


def _duration_s(value: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", value):
        total += float(number) * units[unit]
    assert total > 0, f"cannot read duration {value!r}"
    return total


def _mounts(service: dict) -> list[tuple[str, str]]:
    """(source, container path) of every volume of a service, short syntax."""
    mounts = []
    for volume in service.get("volumes", []):
        source, target, *_ = volume.split(":")
        mounts.append((source, target))
    return mounts


def _host_path(service: dict, container_path: str):
    """The repository file a bind mount puts at ``container_path``, or None."""
    wanted = PurePosixPath(container_path)
    for source, target in _mounts(service):
        if source.startswith(".") and (
            wanted == PurePosixPath(target) or PurePosixPath(target) in wanted.parents
        ):
            return REPO / source / wanted.relative_to(target)
    return None


def _published(service: dict) -> list[tuple[int, int]]:
    """(host port, container port) of every published port."""
    out = []
    for port in service.get("ports", []):
        host, container = str(port).split(":")[-2:]
        out.append((int(host), int(container)))
    return out


def test_services_and_profiles():
    profiles = {name: tuple(service.get("profiles", ())) for name, service in SERVICES.items()}
    assert profiles == {
        "cbam-serve": (),
        "cbam-serve-gpu": ("gpu",),
        "cbam-replica": ("scale",),
        "nginx": ("scale",),
        "prometheus": (),
        "jaeger": (),
        "grafana": (),
        "locust-master": (),
        "locust-worker": (),
    }


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_build_and_bind_mount_exists(name):
    service = SERVICES[name]
    assert "image" in service or "build" in service, f"{name}: neither image nor build"
    if "build" in service:
        build = service["build"]
        assert (REPO / build["context"]).is_dir(), f"{name}: no build context {build['context']}"
        assert (REPO / build["context"] / build["dockerfile"]).is_file(), f"{name}: no {build['dockerfile']}"
        stages = _stages(build["dockerfile"])
        assert build["target"] in stages, f"{name}: target {build['target']!r} not in stages {sorted(stages)}"
        declared = set(
            re.findall(r"^ARG\s+(\w+)", (REPO / build["dockerfile"]).read_text(), flags=re.MULTILINE)
        )
        assert set(build.get("args", {})) <= declared, f"{name}: build args not declared with ARG"
    named_volumes = set(COMPOSE.get("volumes") or {})
    for source, target in _mounts(service):
        if source.startswith("."):
            assert (REPO / source).exists(), f"{name}: mounts {source}, which does not exist"
        else:
            assert source in named_volumes, f"{name}: volume {source!r} is not declared under volumes:"
        assert target.startswith("/"), f"{name}: mount target {target!r} is not absolute"


def test_host_ports_do_not_clash():
    # Every profile at once: `--profile gpu --profile scale` must start too.
    seen: dict[int, str] = {}
    for name, service in SERVICES.items():
        for host, _ in _published(service):
            assert host not in seen, f"host port {host} published by both {seen[host]} and {name}"
            seen[host] = name
        replicas = service.get("deploy", {}).get("replicas", 1)
        if replicas > 1:
            assert not service.get("ports"), f"{name}: {replicas} replicas cannot share fixed host ports"


def test_depends_on_names_services_and_waits_only_for_health_it_can_see():
    for name, service in SERVICES.items():
        depends = service.get("depends_on", {})
        conditions = (
            depends if isinstance(depends, dict) else {d: {"condition": "service_started"} for d in depends}
        )
        for other, spec in conditions.items():
            assert other in SERVICES, f"{name} depends on unknown service {other}"
            if spec["condition"] == "service_healthy":
                assert "healthcheck" in SERVICES[other], (
                    f"{name} waits for {other} to be healthy; it has no check"
                )
            # A default-profile service must not wait on one that only runs in a profile.
            if not service.get("profiles"):
                assert not SERVICES[other].get("profiles"), f"{name} depends on profiled service {other}"


@pytest.mark.parametrize("name", SERVE)
def test_serve_containers_check_grpc_health_and_outlast_the_drain(name):
    service = SERVICES[name]
    test = service["healthcheck"]["test"]
    assert test[:2] == ["CMD", "python"], test
    # The script is where the image puts it.
    serve_stage = _stages(service["build"]["dockerfile"])["build"]
    assert f"COPY deploy/grpc_health_check.py {test[2]}" in serve_stage
    assert _duration_s(service["stop_grace_period"]) > DEFAULTS.grace_seconds
    assert service["build"]["target"] == "serve"
    published = dict((c, h) for h, c in _published(service))
    assert set(published) <= {DEFAULTS.port, DEFAULTS.metrics.port}, published


def _settings_field(path: list[str]) -> bool:
    model: type[BaseModel] = Settings
    for i, part in enumerate(path):
        field = model.model_fields.get(part)
        if field is None:
            return False
        annotation = field.annotation
        if i < len(path) - 1:
            if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                return False
            model = annotation
    return True


# OpenTelemetry's own variables, read by the server's tracing (server/config.py, server/tracing.py).
OTEL_VARIABLES = {"OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_SERVICE_NAME"}


@pytest.mark.parametrize("name", SERVE)
def test_serve_environment_names_real_settings(name, env):
    environment = SERVICES[name].get("environment", {})
    for key, value in environment.items():
        if key in OTEL_VARIABLES:
            continue
        assert key.startswith("CBAM_"), key
        path = key.removeprefix("CBAM_").lower().split("__")
        assert _settings_field(path), f"{name}: {key} is not a Settings field ({'.'.join(path)})"
        env.set(key, str(value))
    Settings()  # and the values validate


@pytest.mark.parametrize("name", SERVE)
def test_every_serve_service_sends_traces_to_jaeger_under_its_own_name(name, env):
    environment = SERVICES[name]["environment"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", environment["OTEL_EXPORTER_OTLP_ENDPOINT"]).groups()
    assert host == "jaeger" and int(port) == 4317  # OTLP over gRPC, what the server exports
    assert SERVICES["jaeger"]["environment"]["COLLECTOR_OTLP_ENABLED"] == "true"
    assert environment["OTEL_SERVICE_NAME"] == name
    env.set("OTEL_EXPORTER_OTLP_ENDPOINT", environment["OTEL_EXPORTER_OTLP_ENDPOINT"])
    assert Settings().tracing.enabled  # the endpoint alone turns tracing on
    # The image has what tracing needs: the server refuses to start with tracing on and no OpenTelemetry.
    assert re.search(r"pip install \"\.\[[\w,]*tracing", _stages("deploy/Dockerfile")["build"])


def test_gpu_profile_reserves_an_nvidia_gpu_and_installs_cuda_torch():
    service = SERVICES["cbam-serve-gpu"]
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert service["environment"]["CBAM_MODEL__DEVICE"].startswith("cuda")
    assert "/whl/cu" in service["build"]["args"]["TORCH_INDEX_URL"]
    # The default CPU service must stay on the CPU wheel index.
    assert "TORCH_INDEX_URL" not in SERVICES["cbam-serve"]["build"].get("args", {})


def test_balancer_profile_puts_nginx_in_front_of_the_replicas():
    nginx = SERVICES["nginx"]
    config_path = _host_path(nginx, "/etc/nginx/nginx.conf")
    assert config_path == REPO / "deploy/nginx/nginx.conf"
    config = config_path.read_text(encoding="utf-8")
    listen = re.search(r"^\s*listen\s+(\d+)\s+http2;", config, flags=re.MULTILINE)
    assert listen and [c for _, c in _published(nginx)] == [int(listen.group(1))]
    backends = re.findall(r"^\s*server\s+([\w.-]+):(\d+)\s", config, flags=re.MULTILINE)
    assert backends == [("cbam-replica", str(DEFAULTS.port))]
    assert SERVICES["cbam-replica"]["deploy"]["replicas"] >= 2
    assert nginx["depends_on"]["cbam-replica"]["condition"] == "service_healthy"


def test_prometheus_gets_the_repo_configuration_and_scrapes_every_serve_service():
    prometheus = SERVICES["prometheus"]
    config_flag = next(a for a in prometheus["command"] if a.startswith("--config.file="))
    config_path = _host_path(prometheus, config_flag.split("=", 1)[1])
    assert config_path == REPO / "deploy/prometheus/prometheus.yml"
    config = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "cbam-serve")
    (dns,) = job["dns_sd_configs"]
    assert set(dns["names"]) == set(SERVE)
    assert dns["port"] == DEFAULTS.metrics.port
    # Latency exemplars (trace ids) are stored, for the dashboard to link to traces.
    assert "--enable-feature=exemplar-storage" in prometheus["command"]
    # Every rule file the configuration names is mounted with it.
    for pattern in config["rule_files"]:
        assert list(config_path.parent.glob(pattern)), f"rule_files {pattern!r} matches nothing"


def test_grafana_is_provisioned_from_the_repo():
    grafana = SERVICES["grafana"]
    provisioning = _host_path(grafana, "/etc/grafana/provisioning")
    assert provisioning == REPO / "deploy/grafana/provisioning"
    providers = yaml.safe_load((provisioning / "dashboards/cbam-serve.yml").read_text())["providers"]
    for provider in providers:
        dashboards = _host_path(grafana, provider["options"]["path"])
        assert dashboards is not None and list(dashboards.glob("*.json")), provider
    home = _host_path(grafana, grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"])
    assert home is not None and home.is_file()
    (datasource,) = yaml.safe_load((provisioning / "datasources/prometheus.yml").read_text())["datasources"]
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", datasource["url"]).groups()
    assert host in SERVICES and host == "prometheus"
    assert (int(port), int(port)) in _published(SERVICES["prometheus"])
    # Exemplars open their trace in the Jaeger data source, which reads the jaeger service.
    (jaeger,) = yaml.safe_load((provisioning / "datasources/jaeger.yml").read_text())["datasources"]
    (link,) = datasource["jsonData"]["exemplarTraceIdDestinations"]
    assert link == {"name": "trace_id", "datasourceUid": jaeger["uid"]}
    host, port = re.fullmatch(r"http://([\w-]+):(\d+)", jaeger["url"]).groups()
    assert host == "jaeger" and jaeger["type"] == "jaeger"
    assert (int(port), int(port)) in _published(SERVICES["jaeger"])
    # $__rate_interval is built from timeInterval: it must be the real scrape interval.
    prometheus_config = yaml.safe_load(
        (REPO / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8")
    )
    assert datasource["jsonData"]["timeInterval"] == prometheus_config["global"]["scrape_interval"]


def test_locust_runs_distributed_against_the_service():
    master, worker = SERVICES["locust-master"], SERVICES["locust-worker"]
    assert master["build"] == worker["build"] and master["build"]["target"] == "loadtest"
    assert "--master" in master["command"]
    host = master["command"][master["command"].index("--host") + 1]
    default_target = re.fullmatch(r"\$\{CBAM_LOAD_TARGET:-([\w-]+):(\d+)\}", host)
    assert default_target, f"--host {host!r}: expected ${{CBAM_LOAD_TARGET:-service:port}}"
    service, port = default_target.groups()
    assert service == "cbam-serve" and int(port) == DEFAULTS.port
    assert worker["command"][worker["command"].index("--master-host") + 1] == "locust-master"
    assert worker["deploy"]["replicas"] >= 2
    expected = int(master["command"][master["command"].index("--expect-workers") + 1])
    assert expected == worker["deploy"]["replicas"]
    loadtest_stage = _stages("deploy/Dockerfile")["loadtest"]
    assert "loadtest/locustfile.py" in loadtest_stage


def test_docker_compose_accepts_the_file():
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("the docker compose plugin is not installed; the structural tests above stand in for it")
    for profile in ([], ["--profile", "gpu", "--profile", "scale"]):
        done = subprocess.run(
            [docker, "compose", "-f", str(REPO / "docker-compose.yml"), *profile, "config", "-q"],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        assert done.returncode == 0, done.stderr
