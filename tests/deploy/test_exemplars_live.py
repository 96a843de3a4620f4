"""Exemplars, live: a cbam-serve with tracing on (exporting to a real OTLP receiver) gives its latency
histograms trace ids as exemplars, in the OpenMetrics exposition; a real Prometheus with exemplar
storage, configured from deploy/prometheus, scrapes them, and each one names a trace the server sent."""

from __future__ import annotations

import time
import urllib.parse
import urllib.request
from collections.abc import Iterator

import pytest
import yaml
from deploy_support import REPO, http_get_json, start_prometheus

from client import Client
from server.launcher import ServerProcess
from tests.support import wait_for

pytestmark = pytest.mark.slow

CALLS = 5
OPENMETRICS = "application/openmetrics-text; version=1.0.0"


@pytest.fixture(scope="module")
def traced_server(otlp_sink) -> Iterator[ServerProcess]:
    args = ("--tracing.enabled", "true", "--tracing.endpoint", otlp_sink.endpoint)
    with ServerProcess(*args, env={"OTEL_BSP_SCHEDULE_DELAY": "50"}) as server:
        yield server


@pytest.fixture(scope="module")
def prometheus(require_binary, processes, traced_server, tmp_path_factory) -> str:
    config = yaml.safe_load((REPO / "deploy/prometheus/prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    del config["rule_files"]  # test_monitoring_live.py checks the rules
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cbam-serve"]
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [urllib.parse.urlsplit(traced_server.metrics_url).netloc]}]
    config["scrape_configs"] = [job]
    home = tmp_path_factory.mktemp("prometheus-exemplars")
    binary = require_binary("prometheus")
    # As docker-compose.yml runs it.
    return start_prometheus(processes, binary, config, home, "--enable-feature=exemplar-storage")


def _exemplars(prometheus: str, query: str, start: float) -> list[dict]:
    window = {"start": f"{start:.3f}", "end": f"{time.time() + 1:.3f}"}
    params = urllib.parse.urlencode({"query": query, **window})
    body = http_get_json(f"{prometheus}/api/v1/query_exemplars?{params}")
    assert body["status"] == "success", body
    return [exemplar for series in body["data"] for exemplar in series["exemplars"]]


def test_latency_exemplars_name_traces_the_server_exported(traced_server, otlp_sink, prometheus, sample_png):
    start = time.time() - 1
    with Client(traced_server.address) as client:
        for _ in range(CALLS):
            client.classify(sample_png)
    exported = {
        span.trace_id.hex()
        for span in otlp_sink.wait_for(
            lambda spans: sum(s.name.endswith("/Classify") for s in spans) >= CALLS, timeout_s=60
        )
    }
    # The endpoint serves OpenMetrics, with exemplars, to a scraper that asks for it.
    request = urllib.request.Request(traced_server.metrics_url, headers={"Accept": OPENMETRICS})
    with urllib.request.urlopen(request, timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        page = response.read().decode()
    assert any(
        line.startswith("cbam_request_duration_seconds_bucket") and '# {trace_id="' in line
        for line in page.splitlines()
    )
    for histogram in ("cbam_request_duration_seconds_bucket", "grpc_server_handling_seconds_bucket"):
        query = f'{histogram}{{job="cbam-serve", grpc_method=~"Classify|", method=~"Classify|"}}'
        found = wait_for(
            lambda query=query: _exemplars(prometheus, query, start),
            timeout_s=30,
            what=f"Prometheus to store exemplars of {histogram}",
        )
        trace_ids = {exemplar["labels"]["trace_id"] for exemplar in found}
        assert trace_ids and trace_ids <= exported, (histogram, trace_ids - exported)
        assert all(0 < float(exemplar["value"]) < 60 for exemplar in found)
