"""connections=N: N connections to the server, calls over them in turn (one connection reaches one worker
of a server with --workers; tests/e2e/test_workers.py checks that end of it)."""

import collections

import pytest

from client import AsyncClient, Client


def test_one_connection_by_default(scripted):
    servicer, address = scripted
    with Client(address) as client:
        for _ in range(6):
            client.model_info()
    assert len(set(servicer.peers)) == 1


def test_calls_take_the_connections_in_turn(scripted):
    servicer, address = scripted
    with Client(address, connections=3) as client:
        for _ in range(9):
            client.model_info()
    counts = collections.Counter(servicer.peers)
    assert sorted(counts.values()) == [3, 3, 3], counts


async def test_the_async_client_takes_them_in_turn_too(scripted):
    servicer, address = scripted
    async with AsyncClient(address, connections=2) as client:
        for _ in range(4):
            await client.model_info()
    assert sorted(collections.Counter(servicer.peers).values()) == [2, 2]


@pytest.mark.parametrize("connections", [0, -1])
def test_fewer_than_one_connection_is_refused(connections):
    with pytest.raises(ValueError, match="connections should be >= 1"):
        Client("127.0.0.1:1", connections=connections)
