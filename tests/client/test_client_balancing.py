"""Client-side balancing (issue 7 §2): round_robin over a list of replicas, and over a dns:/// name."""

import pytest
from real_server import free_port, requests_total

from client import Client, build_target
from server.launcher import ServerProcess
from tests.support import wait_for

pytestmark = pytest.mark.slow  # two more servers of its own

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


def _connected_to_all(client: Client, servers) -> None:
    """Call until every server has answered once: round_robin uses a replica once its connection is up,
    and on a slow machine the second one can come up after the first calls."""
    before = [requests_total(s.metrics_url, "GetModelInfo") for s in servers]

    def all_answered() -> bool:
        client.model_info()
        now = [requests_total(s.metrics_url, "GetModelInfo") for s in servers]
        return all(n > b for n, b in zip(now, before, strict=True))

    wait_for(all_answered, what="every replica to answer a call")


def test_round_robin_over_a_list_of_replicas_uses_both(live, twins):
    _, other, _ = twins
    assert build_target([live.address, other.address]).startswith("ipv4:")
    with Client([live.address, other.address]) as client:
        _connected_to_all(client, [live, other])
        spread = _spread([live, other], lambda: [client.model_info() for _ in range(CALLS)])
    assert sum(spread) == CALLS
    assert min(spread) >= CALLS // 2 - 1  # round_robin alternates once both are connected


def test_round_robin_over_a_dns_name_uses_every_address(twins):
    port, v4, v6 = twins
    with Client(f"dns:///localhost:{port}") as client:
        _connected_to_all(client, [v4, v6])  # "localhost" gave both addresses, and each was used
        spread = _spread([v4, v6], lambda: [client.model_info() for _ in range(CALLS)])
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
