"""The parts of the supervisor that need no worker: how many workers, their settings, the port it holds,
and the one /metrics endpoint over every worker's (real HTTP on loopback)."""

from __future__ import annotations

import socket
import threading
import urllib.request
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from prometheus_client.openmetrics.exposition import CONTENT_TYPE_LATEST as OPENMETRICS
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_text
from pydantic import ValidationError

from server.config import Settings, usable_cores
from server.errors import StartupError
from server.metrics import MetricsEndpoint, ServerMetrics, SupervisorMetrics, WorkerExpositions
from server.supervisor import reserve_port, worker_count, worker_settings


@pytest.mark.parametrize("value", ["-1", "65", "two"])
def test_a_bad_worker_count_is_refused_naming_the_field(value: str) -> None:
    with pytest.raises(ValidationError, match="workers"):
        Settings(_cli_parse_args=["--workers", value])


def test_an_explicit_worker_count_is_kept() -> None:
    assert worker_count(Settings(workers=3)) == 3


def test_auto_is_one_worker_per_four_cores_from_one_to_eight() -> None:
    assert worker_count(Settings()) == max(1, min(8, usable_cores() // 4))


@pytest.mark.parametrize(
    ("files", "cpus"),
    [
        ({"cpu.max": "150000 100000\n"}, 1.5),  # cgroup v2, a limit of 1.5 CPUs
        ({"cpu.max": "max 100000\n"}, None),  # v2, no limit
        ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4.0),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),  # v1, no limit
        ({}, None),  # no cgroup CPU controller to read
    ],
)
def test_a_containers_cpu_limit_counts_as_fewer_cores(tmp_path, files: dict[str, str], cpus) -> None:
    from server.config import _cpu_quota

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert _cpu_quota(tmp_path) == cpus


def test_workers_share_the_cores_and_the_port_and_keep_metrics_on_loopback() -> None:
    settings = Settings(port=0, metrics={"host": "0.0.0.0", "port": 9100})
    spec = worker_settings(settings, 2, 40123)
    share = max(1, usable_cores() // 2)
    assert (spec.port, spec.workers) == (40123, 1)
    assert spec.torch_threads == share and spec.preprocess_threads == max(1, share // 2)
    assert (spec.metrics.host, spec.metrics.port, spec.metrics.enabled) == ("127.0.0.1", 0, True)
    assert settings.port == 0 and settings.metrics.port == 9100  # the original is untouched


def test_threads_given_by_the_operator_are_kept() -> None:
    spec = worker_settings(Settings(torch_threads=3, preprocess_threads=2), 4, 40123)
    assert (spec.torch_threads, spec.preprocess_threads) == (3, 2)


def test_worker_settings_travel_to_the_worker_intact() -> None:
    import pickle

    settings = worker_settings(Settings(auth={"tokens": "a,b"}, batching={"max_batch_size": 8}), 2, 1)
    copy = pickle.loads(pickle.dumps(settings))
    assert copy == settings
    assert [t.get_secret_value() for t in copy.auth.tokens] == ["a", "b"]


def _listener(port: int = 0, reuse_port: bool = False) -> socket.socket:
    """A listening socket as gRPC makes one (SO_REUSEADDR; SO_REUSEPORT when asked)."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, int(reuse_port))
        sock.bind(("127.0.0.1", port))
        sock.listen()
    except OSError:
        sock.close()
        raise
    return sock


def test_port_0_is_resolved_and_held_for_workers_with_so_reuseport() -> None:
    held, port = reserve_port("127.0.0.1", 0)
    try:
        assert port > 0 and all(s.getsockname()[1] == port for s in held)
        with pytest.raises(OSError):  # a server that does not share ports: refused...
            _listener(port).close()
        with _listener(port, reuse_port=True), pytest.raises(OSError):  # ...also beside a worker
            _listener(port).close()
        with pytest.raises(OSError):  # ...and once every worker is gone
            _listener(port).close()
    finally:
        for sock in held:
            sock.close()


def test_a_port_held_by_another_server_is_refused_naming_it() -> None:
    with _listener() as other:
        port = other.getsockname()[1]
        with pytest.raises(StartupError, match=f"port: cannot listen on 127.0.0.1:{port}"):
            reserve_port("127.0.0.1", port)


def test_another_supervisors_port_is_refused_though_it_shares_with_its_own_workers() -> None:
    # The other supervisor's workers listen with SO_REUSEPORT; joining them would be silent sharing.
    held, port = reserve_port("127.0.0.1", 0)
    try:
        with _listener(port, reuse_port=True), pytest.raises(StartupError, match="port"):
            reserve_port("127.0.0.1", port)
    finally:
        for sock in held:
            sock.close()


def test_an_unresolvable_host_is_refused_naming_it() -> None:
    with pytest.raises(StartupError, match="host: cannot resolve"):
        reserve_port("no-such-host.invalid", 0)


@pytest.fixture
def two_workers():
    """Two workers' registries, each behind its own loopback /metrics, as worker processes have them."""
    workers = [ServerMetrics(), ServerMetrics()]
    endpoints = [MetricsEndpoint(w.registry, "127.0.0.1", 0) for w in workers]
    yield workers, endpoints
    for endpoint in endpoints:
        endpoint.close()


def _scrape(port: int, accept: str | None = None) -> tuple[str, str]:
    headers = {"Accept": accept} if accept else {}
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def test_one_endpoint_serves_every_workers_series_labelled_by_worker(two_workers) -> None:
    workers, endpoints = two_workers
    workers[0].requests.labels("Classify", "OK").inc(3)
    workers[1].requests.labels("Classify", "OK").inc(4)
    workers[1].queue_depth.set(7)
    workers[0].describe_model(arch="a", version="v", device="cpu", dtype="float32", backend="eager")
    supervisor = SupervisorMetrics()
    supervisor.workers.labels("serving").set(2)
    targets = [("0", endpoints[0].port), ("1", endpoints[1].port)]
    supervisor.registry.register(WorkerExpositions(lambda: targets))
    endpoint = MetricsEndpoint(supervisor.registry, "127.0.0.1", 0)
    try:
        content_type, text = _scrape(endpoint.port)
    finally:
        endpoint.close()
    assert content_type.startswith("text/plain")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value for f in parse_text(text) for s in f.samples
    }
    ok = (("code", "OK"), ("method", "Classify"))
    assert samples[("cbam_requests_total", (*ok, ("worker", "0")))] == 3
    assert samples[("cbam_requests_total", (*ok, ("worker", "1")))] == 4
    assert samples[("cbam_queue_depth", (("worker", "1"),))] == 7
    assert samples[("cbam_workers", (("state", "serving"),))] == 2
    assert ("cbam_model_info", (("arch", "a"), ("backend", "eager"), ("device", "cpu"), ("dtype", "float32"),
                                ("version", "v"), ("worker", "0"))) in samples  # fmt: skip
    assert text.count("# TYPE cbam_requests_total ") == 1  # one family, not one per worker


def test_openmetrics_scrapers_get_openmetrics_with_the_workers_exemplars(two_workers) -> None:
    workers, endpoints = two_workers
    workers[1].request_seconds.labels("Classify", "OK").observe(0.003, exemplar={"trace_id": "abc123"})
    supervisor = SupervisorMetrics()
    supervisor.registry.register(WorkerExpositions(lambda: [("1", endpoints[1].port)]))
    endpoint = MetricsEndpoint(supervisor.registry, "127.0.0.1", 0)
    try:
        content_type, text = _scrape(endpoint.port, OPENMETRICS)
    finally:
        endpoint.close()
    assert content_type.startswith("application/openmetrics-text")
    exemplars = [
        s.exemplar
        for f in parse_openmetrics(text)
        if f.name == "cbam_request_duration_seconds"
        for s in f.samples
        if s.exemplar is not None
    ]
    assert [(e.labels, e.value) for e in exemplars] == [({"trace_id": "abc123"}, 0.003)]


def test_a_worker_that_cannot_be_read_is_left_out_of_that_scrape(two_workers) -> None:
    workers, endpoints = two_workers
    workers[0].requests.labels("Classify", "OK").inc()
    gone = endpoints[1].port
    endpoints[1].close()
    garbled = HTTPServer(("127.0.0.1", 0), _Garbled)  # answers, but not with an exposition
    threading.Thread(target=garbled.serve_forever, daemon=True).start()
    try:
        targets = [("0", endpoints[0].port), ("1", gone), ("2", garbled.server_port)]
        collector = WorkerExpositions(lambda: targets, timeout_s=2)
        names = {s.labels.get("worker") for f in collector.collect() for s in f.samples}
    finally:
        garbled.shutdown()
        garbled.server_close()
    assert names == {"0"}


class _Garbled(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"this is { not metrics\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass
