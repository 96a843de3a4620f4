"""Client-side balancing (issue 7 §2): round_robin over a list of replicas, and over a dns:/// name."""

import pytest
from real_server import free_port, requests_total

from client import Client, build_target
from tests.support import ServerProcess

CALLS = 20


@pytest.fixture(scope="module")
def twins():
    """Two replicas on one port number: 127.0.0.1:P and [::1]:P (what "localhost" resolves to)."""
    port = free_port()
    with (
        ServerProcess("--port", str(port)) as v4,
        ServerProcess("--host", "[::1]", "--port", str(port)) as v6,
    ):
        yield port, v4, v6


def _spread(servers, calls) -> list[float]:
    before = [requests_total(s.metrics_url, "GetModelInfo") for s in servers]
    calls()
    return [requests_total(s.metrics_url, "GetModelInfo") - b for s, b in zip(servers, before, strict=True)]


def test_round_robin_over_a_list_of_replicas_uses_both(live, twins):
    _, other, _ = twins
    assert build_target([live.address, other.address]).startswith("ipv4:")

    def calls():
        with Client([live.address, other.address]) as client:
            for _ in range(CALLS):
                client.model_info()

    spread = _spread([live, other], calls)
    assert sum(spread) == CALLS
    assert min(spread) >= CALLS // 2 - 1  # round_robin alternates once both are connected


def test_round_robin_over_a_dns_name_uses_every_address(twins):
    port, v4, v6 = twins

    def calls():
        with Client(f"dns:///localhost:{port}") as client:
            for _ in range(CALLS):
                client.model_info()

    spread = _spread([v4, v6], calls)
    assert sum(spread) == CALLS and min(spread) > 0, spread


def test_the_cli_balances_over_comma_separated_addresses(live, twins, capsys):
    from client.cli import main

    _, other, _ = twins
    before = [requests_total(s.metrics_url, "GetModelInfo") for s in (live, other)]
    for _ in range(4):
        assert main(["info", "--json", "--target", f"{live.address},{other.address}"]) == 0
    capsys.readouterr()
    after = [requests_total(s.metrics_url, "GetModelInfo") for s in (live, other)]
    assert sum(a - b for a, b in zip(after, before, strict=True)) == 4
