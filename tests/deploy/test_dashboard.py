"""deploy/grafana: the provisioned dashboard's structure (the live checks of its queries are in
test_monitoring_live.py)."""

from __future__ import annotations

import json
import re

import yaml
from deploy_support import REPO

GRAFANA = REPO / "deploy/grafana"
DASHBOARD = json.loads((GRAFANA / "dashboards/cbam-serve.json").read_text(encoding="utf-8"))
PANELS = [p for p in DASHBOARD["panels"] if p["type"] != "row"]


def test_the_dashboard_shows_what_an_operator_asks_first():
    titles = {p["title"] for p in PANELS}
    assert {
        "Throughput",
        "Classify latency p50 / p95 / p99",
        "ModelInfer latency p50 / p95 / p99",
        "Queue wait vs inference time",
        "Batch size distribution",
        "Errors by code",
        "In-flight requests",
        "Queue depth",
        "Dropped requests",
    } <= titles
    for method in ("Classify", "ModelInfer"):
        latency = next(p for p in PANELS if p["title"] == f"{method} latency p50 / p95 / p99")
        quantiles = sorted(t["expr"].split("(")[1].split(",")[0] for t in latency["targets"])
        assert quantiles == ["0.50", "0.95", "0.99"]
        assert all(f'method="{method}"' in t["expr"] for t in latency["targets"])
    stages = next(p for p in PANELS if p["title"] == "Queue wait vs inference time")
    assert all('stage=~"queue|inference"' in t["expr"] for t in stages["targets"])
    assert next(p for p in PANELS if p["title"] == "Batch size distribution")["type"] == "heatmap"


def test_latency_panels_show_exemplars_and_gpu_and_grpc_panels_are_there():
    titles = {p["title"]: p for p in PANELS}
    for title in ("Classify latency p50 / p95 / p99", "gRPC handling time p99 by method"):
        assert all(t.get("exemplar") is True for t in titles[title]["targets"]), title
    exprs = " ".join(t["expr"] for p in PANELS for t in p["targets"])
    for name in (
        "cbam_gpu_utilization_ratio", "cbam_gpu_memory_used_bytes", "cbam_gpu_memory_total_bytes",
        "grpc_server_handled_total", "grpc_server_handling_seconds_bucket",
    ):  # fmt: skip
        assert name in exprs, name
    # The exemplar's trace id opens the trace in a provisioned data source.
    sources = [
        source
        for path in (GRAFANA / "provisioning/datasources").glob("*.yml")
        for source in yaml.safe_load(path.read_text())["datasources"]
    ]
    uids = {source["uid"] for source in sources}
    (prometheus,) = [source for source in sources if source["type"] == "prometheus"]
    for link in prometheus["jsonData"]["exemplarTraceIdDestinations"]:
        assert link["name"] == "trace_id" and link["datasourceUid"] in uids


def test_every_panel_uses_the_provisioned_data_source():
    (datasource,) = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    for panel in PANELS:
        assert panel["datasource"] == {"type": "prometheus", "uid": datasource["uid"]}, panel["title"]
        assert panel["targets"], f"{panel['title']} has no query"
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == datasource["uid"]
            assert target["expr"].strip()


def test_panels_have_unique_ids_and_fit_the_grid():
    ids = [p["id"] for p in DASHBOARD["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in DASHBOARD["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps another panel at {(x, y)}"
                cells.add((x, y))


def test_the_dashboard_is_findable_by_name():
    assert DASHBOARD["title"] == "cbam-serve" and DASHBOARD["uid"] == "cbam-serve"
    variables = {v["name"] for v in DASHBOARD["templating"]["list"]}
    assert variables == {"job", "instance"}
    # docs/OPERATIONS.md tells people the dashboard's name; keep the two in step.
    assert "**cbam-serve**" in (REPO / "docs/OPERATIONS.md").read_text(encoding="utf-8")


def test_throughput_shows_each_protocols_images():
    """One series per protocol, each covering every RPC of that protocol that classifies images."""
    from cbam.oip import grpc_service_pb2
    from cbam.v1 import inference_pb2
    from server.protocols.oip_model import INFERENCE_METHODS

    throughput = next(p for p in PANELS if p["title"] == "Throughput")
    series = {t["legendFormat"]: t["expr"] for t in throughput["targets"]}
    for legend, descriptor, service in (
        ("cbam.v1 images/s", inference_pb2, "InferenceService"),
        ("Open Inference Protocol images/s", grpc_service_pb2, "GRPCInferenceService"),
    ):
        methods = set(descriptor.DESCRIPTOR.services_by_name[service].methods_by_name) & set(
            INFERENCE_METHODS
        )
        (shown,) = re.findall(r'method=~"([^"]+)"', series[legend])
        assert set(shown.split("|")) == methods, legend
        assert "cbam_images_total" in series[legend] and 'code="OK"' in series[legend]
