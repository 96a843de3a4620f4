"""A real Prometheus, configured from deploy/prometheus, scraping a real cbam-serve (two workers behind
one endpoint): the numbers it
answers agree with the traffic this test sent, the rules load and evaluate, every dashboard query
runs, and every metric the dashboard, rules and autoscaler read is one the server exports."""

from __future__ import annotations

import json
import math
import re
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime

import grpc
import pytest
import yaml
from deploy_support import REPO, exported_sample_names, http_get_json, promql_names, start_prometheus

from cbam.v1 import inference_pb2, inference_pb2_grpc
from server.launcher import ServerProcess
from tests.support import wait_for

pytestmark = pytest.mark.slow

PROMETHEUS_DIR = REPO / "deploy/prometheus"
RULES = [
    rule
    for path in sorted((PROMETHEUS_DIR / "rules").glob("*.yml"))
    for group in yaml.safe_load(path.read_text(encoding="utf-8"))["groups"]
    for rule in group["rules"]
]
DASHBOARD = json.loads((REPO / "deploy/grafana/dashboards/cbam-serve.json").read_text(encoding="utf-8"))
# Registered only when the server runs on CUDA (server/metrics.py, watch_cuda_memory and watch_gpus).
CUDA_ONLY = {
    "cbam_cuda_memory_allocated_bytes",
    "cbam_cuda_memory_reserved_bytes",
    "cbam_gpu_utilization_ratio",
    "cbam_gpu_memory_used_bytes",
    "cbam_gpu_memory_total_bytes",
}
OK_CALLS, BAD_CALLS = 40, 5


@pytest.fixture(scope="module")
def live_server() -> Iterator[ServerProcess]:
    """The server Prometheus scrapes here runs two workers: the one endpoint that merges them (in the
    OpenMetrics format Prometheus asks for, every series labelled by worker) must serve every panel,
    rule and alert as a single process does, and export the supervisor's own metrics too."""
    with ServerProcess("--workers", "2") as server:
        yield server


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str, at: float | None = None) -> list[dict]:
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        body = http_get_json(f"{self.url}/api/v1/query?{urllib.parse.urlencode(params)}")
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, expr: str, at: float | None = None) -> float:
        result = self.query(expr, at)
        assert len(result) == 1, f"{expr}: expected one series, got {result}"
        return float(result[0]["value"][1])


def _test_config(target: str) -> dict:
    """deploy/prometheus/prometheus.yml with the service's discovery swapped for the test's target."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text(encoding="utf-8"))
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    config["rule_files"] = [str(PROMETHEUS_DIR / pattern) for pattern in config["rule_files"]]
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "cbam-serve"]
    assert "dns_sd_configs" in job, "the test swaps the compose discovery; update it with prometheus.yml"
    del job["dns_sd_configs"]
    job["static_configs"] = [{"targets": [target]}]
    config["scrape_configs"] = [job]
    return config


@pytest.fixture(scope="module")
def prometheus(require_binary, processes, live_server, tmp_path_factory) -> Prometheus:
    target = urllib.parse.urlsplit(live_server.metrics_url).netloc
    home = tmp_path_factory.mktemp("prometheus")
    return Prometheus(start_prometheus(processes, require_binary("prometheus"), _test_config(target), home))


@dataclass
class Traffic:
    before: float  # a time after the calls before the traffic were scraped (twice), before the traffic
    end: float  # the time of a scrape that saw all the traffic
    latencies: list[float]  # client-side seconds of every OK call of the traffic


OK_SERIES = 'cbam_requests_total{job="cbam-serve", method="Classify", code="OK"}'


def _scraped_after(prometheus: Prometheus, t: float) -> float:
    """Wait for Prometheus to hold a sample of OK_SERIES scraped after ``t``; that sample's time."""
    return wait_for(
        lambda: (at := prometheus.value(f"max(timestamp({OK_SERIES}))")) > t and at,
        timeout_s=120,
        what=f"a scrape after {t:.3f}",
    )


def grown(expr: str, at: float) -> str:
    """PromQL for how much ``sum(expr)`` grew since time ``at`` (from 0 if it did not exist then): the
    shared server counts the calls of earlier tests too."""
    return f"(sum({expr}) - (sum({expr} @ {at:.3f}) or vector(0)))"


@pytest.fixture(scope="module")
def traffic(prometheus, live_server, sample_png) -> Traffic:
    """One Classify call (so the series exists); once Prometheus has scraped twice after it, OK_CALLS good
    and BAD_CALLS bad ones; then a scrape that saw them all, and one more: no
    series the traffic made has a single sample after it."""
    wait_for(lambda: prometheus.query('up{job="cbam-serve"} == 1'), timeout_s=120, what="the target to be up")
    latencies = []
    with grpc.insecure_channel(live_server.address) as channel:
        stub = inference_pb2_grpc.InferenceServiceStub(channel)

        def classify(image: bytes) -> float:
            started = time.perf_counter()
            stub.Classify(inference_pb2.ClassifyRequest(encoded=image), timeout=60)
            return time.perf_counter() - started

        classify(sample_png)
        before = _scraped_after(prometheus, _scraped_after(prometheus, time.time()))
        for _ in range(OK_CALLS):
            latencies.append(classify(sample_png))
        for _ in range(BAD_CALLS):
            with pytest.raises(grpc.RpcError) as error:
                stub.Classify(inference_pb2.ClassifyRequest(encoded=b"not an image"), timeout=60)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    bad = 'cbam_requests_total{job="cbam-serve", method="Classify", code="INVALID_ARGUMENT"}'
    seen = wait_for(
        lambda: prometheus.value(grown(OK_SERIES, before)) == OK_CALLS
        and prometheus.value(grown(bad, before)) == BAD_CALLS
        and prometheus.value(f"max(timestamp({OK_SERIES}))"),
        timeout_s=120,
        what="a scrape after the traffic",
    )
    return Traffic(before=before, end=_scraped_after(prometheus, seen), latencies=latencies)


def _bucket_ceiling(seconds: float) -> float:
    """The upper bound of the latency histogram bucket that holds ``seconds``."""
    from server.metrics import LATENCY_BUCKETS

    return next((b for b in LATENCY_BUCKETS if seconds <= b), math.inf)


def test_prometheus_scrapes_the_service_as_the_repo_configures_it(prometheus, traffic):
    (up,) = prometheus.query('up{job="cbam-serve"}')
    assert up["value"][1] == "1"
    infos = prometheus.query('cbam_model_info{job="cbam-serve"}')  # one per worker
    assert sorted(i["metric"]["worker"] for i in infos) == ["0", "1"]
    assert all(i["metric"]["device"] == "cpu" for i in infos)
    assert prometheus.value('cbam_workers{job="cbam-serve", state="serving"}') == 2
    assert prometheus.value('sum(cbam_worker_restarts_total{job="cbam-serve"})') == 0


def test_request_counts_are_what_the_client_sent(prometheus, traffic):
    selector = 'job="cbam-serve", method="Classify"'

    def grew(expr: str) -> float:
        return prometheus.value(grown(expr, traffic.before), at=traffic.end)

    assert grew(f'cbam_requests_total{{{selector}, code="OK"}}') == OK_CALLS
    assert grew(f'cbam_requests_total{{{selector}, code="INVALID_ARGUMENT"}}') == BAD_CALLS
    assert grew(f'cbam_images_total{{{selector}, code="OK"}}') == OK_CALLS
    # increase() extrapolates to the window's edges, so it may overshoot a little, never undershoot
    # (the window starts at `before`, with that sample from before the traffic in it).
    window = f"{round((traffic.end - traffic.before) * 1000) + 1}ms"
    ok = f'cbam_requests_total{{{selector}, code="OK"}}'
    increase = prometheus.value(f"sum(increase({ok}[{window}]))", at=traffic.end)
    assert OK_CALLS <= increase <= OK_CALLS * 1.3
    assert prometheus.value(f"sum(rate({ok}[{window}]))", at=traffic.end) > 0


def test_latency_quantiles_are_bounded_by_what_the_client_measured(prometheus, traffic):
    # The server's time for a call is part of the client's, so every server-side quantile lies at or
    # below the bucket holding the same client-side quantile; seconds measured as milliseconds, or a
    # histogram fed the wrong calls, would not.
    buckets = 'cbam_request_duration_seconds_bucket{job="cbam-serve", method="Classify", code="OK"}'
    window = f"{round((traffic.end - traffic.before) * 1000) + 1}ms"
    measured = sorted(traffic.latencies)
    for q in (0.5, 0.99):
        client = measured[min(len(measured) - 1, math.ceil(q * len(measured)) - 1)]
        grew = f"{buckets} - {buckets} @ {traffic.before:.3f}"
        server = prometheus.value(f"histogram_quantile({q}, sum by (le) ({grew}))", at=traffic.end)
        assert 0 < server <= _bucket_ceiling(client), (q, server, client)
        server_rate = prometheus.value(
            f"histogram_quantile({q}, sum by (le) (rate({buckets}[{window}])))", at=traffic.end
        )
        assert 0 < server_rate <= _bucket_ceiling(client), (q, server_rate, client)
    ok = 'cbam_request_duration_seconds_{}{{job="cbam-serve", method="Classify", code="OK"}}'
    count = prometheus.value(grown(ok.format("count"), traffic.before), at=traffic.end)
    assert count == OK_CALLS
    total = prometheus.value(grown(ok.format("sum"), traffic.before), at=traffic.end)
    assert 0 < total <= sum(traffic.latencies)


def _unix(rfc3339: str) -> float:
    """Seconds since the epoch of a time as Prometheus' API writes it (nanoseconds, Z or an offset)."""
    pattern = r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)"
    stamp, fraction, zone = re.fullmatch(pattern, rfc3339).groups()
    whole = datetime.fromisoformat(stamp + ("+00:00" if zone == "Z" else zone))
    return whole.timestamp() + float(fraction or 0)


def test_the_rules_load_evaluate_and_stay_quiet(prometheus, traffic):
    def evaluated_after_the_traffic() -> list[dict]:
        groups = http_get_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
        if all(_unix(group["lastEvaluation"]) > traffic.end for group in groups):
            return [rule for group in groups for rule in group["rules"]]
        return []

    rules = wait_for(evaluated_after_the_traffic, timeout_s=120, what="every rule group to evaluate again")
    assert sorted(r["name"] for r in rules) == sorted(r.get("record") or r["alert"] for r in RULES)
    for rule in rules:
        assert rule["health"] == "ok", f"{rule['name']}: {rule.get('lastError')}"
    firing = [
        a["labels"]["alertname"] for a in http_get_json(f"{prometheus.url}/api/v1/alerts")["data"]["alerts"]
    ]
    assert firing == [], f"alerts on a healthy, idle service: {firing}"
    # The recording rules produce series from the live data.
    assert prometheus.query('job_method_code:cbam_requests:rate1m{job="cbam-serve", method="Classify"}')


def _dashboard_queries() -> list[tuple[str, str]]:
    return [(p["title"], t["expr"]) for p in DASHBOARD["panels"] for t in p.get("targets", [])]


def test_every_dashboard_query_runs_and_shows_data(prometheus, traffic):
    # Grafana's variables, as Grafana would fill them: one job, every replica, a window that covers
    # the traffic.
    window = f"{math.ceil(time.time() - traffic.before) + 5}s"
    for title, expr in _dashboard_queries():
        query = (
            expr.replace("$__rate_interval", window).replace("$job", "cbam-serve").replace("$instance", ".*")
        )
        assert "$" not in query, f"{title}: unknown variable in {expr}"
        result = prometheus.query(query)  # fails on a PromQL error
        metrics, _ = promql_names(expr)
        if not metrics & CUDA_ONLY:
            assert result, f"panel {title!r} would show no data: {query}"


def test_every_metric_read_by_dashboard_rules_and_autoscaler_is_exported(live_server, traffic):
    with urllib.request.urlopen(live_server.metrics_url, timeout=5) as response:
        exported = exported_sample_names(response.read().decode())
    exported.add("up")  # added by Prometheus to every target
    read: dict[str, set[str]] = {}
    for title, expr in _dashboard_queries():
        read.setdefault(f"dashboard panel {title!r}", set()).update(promql_names(expr)[0])
    recorded = {rule["record"] for rule in RULES if "record" in rule}
    for rule in RULES:
        metrics, reads_recorded = promql_names(rule["expr"])
        name = rule.get("record") or rule["alert"]
        read[f"rule {name}"] = metrics
        assert reads_recorded <= recorded, (
            f"rule {name} reads series no rule records: {reads_recorded - recorded}"
        )
    hpa = yaml.safe_load((REPO / "deploy/k8s/hpa.yaml").read_text())
    read["HorizontalPodAutoscaler"] = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"]}

    metrics_source = (REPO / "server/metrics.py").read_text(encoding="utf-8")
    for name in CUDA_ONLY:  # not on a CPU server's page, so at least check the server defines them
        assert f'"{name}"' in metrics_source
    for reader, names in read.items():
        missing = names - exported - CUDA_ONLY
        assert not missing, f"{reader} reads {sorted(missing)}, which cbam-serve does not export"
    assert re.search(r"cbam_\w+", " ".join(sorted(set().union(*read.values()))))
