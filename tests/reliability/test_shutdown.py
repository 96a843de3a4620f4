"""SIGTERM under load: every request the server accepted gets its answer or a definite status, from a
single process and from two workers under a supervisor (each with calls in flight when SIGTERM comes).

The server logs the outcome of every request (at DEBUG, with its request_id), so each call the
client made is one of:
    answered   OK
    rejected   refused with a status the server decided (it logged the same code), or never
               accepted at all (UNAVAILABLE, and the server has no record of it)
    lost       anything else: the server finished it but the client never heard, or the call ended
               in a way nobody decided (DEADLINE_EXCEEDED with a long deadline, a broken stream...)
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import signal
import threading
import time

import grpc
import pytest

from cbam.v1 import inference_pb2 as pb
from server.launcher import ServerProcess
from tests.reliability import corpus
from tests.reliability.probes import stub_for
from tests.support import eventually, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(400)]

GRACE_S = 10
IMAGE = corpus.encode(corpus.picture(32, 32, seed=4))
CALL_TIMEOUT_S = 60  # far beyond the grace period: a DEADLINE_EXCEEDED means a hang


class Ledger:
    def __init__(self) -> None:
        self.client: dict[str, tuple[str, str]] = {}  # request_id -> (code name, details)
        self._ids = itertools.count()

    def new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids)}"


async def _unary_worker(stub, ledger: Ledger, stopping: asyncio.Event) -> None:
    while True:
        request_id = ledger.new_id("u")
        try:
            request = pb.ClassifyRequest(request_id=request_id, encoded=IMAGE)
            await stub.Classify(request, timeout=CALL_TIMEOUT_S)
            ledger.client[request_id] = ("OK", "")
        except grpc.aio.AioRpcError as exc:
            ledger.client[request_id] = (exc.code().name, exc.details() or "")
            if stopping.is_set():
                return
        if stopping.is_set() and ledger.client[request_id][0] != "OK":
            return


def _stream_worker(address: str, ledger: Ledger, stopping: threading.Event) -> None:
    """Streams of 12 items, one after another, with the synchronous API (in a thread).

    Not grpc.aio: when a server ends a stream (here UNAVAILABLE, draining) before the client has
    sent all of it, the asyncio client can report INTERNAL "Internal error from Core" instead of the
    server's status (grpc/grpc#36066). The synchronous client reports what the server sent.
    """
    with grpc.insecure_channel(address) as channel:
        stub = stub_for(channel)
        while True:
            ids = [ledger.new_id("s") for _ in range(12)]
            requests = [pb.ClassifyRequest(request_id=i, encoded=IMAGE) for i in ids]
            seen: set[str] = set()
            try:
                for answer in stub.ClassifyStream(iter(requests), timeout=CALL_TIMEOUT_S):
                    seen.add(answer.request_id)
                    if answer.WhichOneof("outcome") == "response":
                        ledger.client[answer.request_id] = ("OK", "")
                    else:
                        code = next(c for c in grpc.StatusCode if c.value[0] == answer.error.code)
                        ledger.client[answer.request_id] = (code.name, answer.error.message)
            except grpc.RpcError as exc:
                for i in ids:
                    if i not in seen:
                        ledger.client[i] = (exc.code().name, f"stream ended: {exc.details()}")
                if stopping.is_set():
                    return
            if stopping.is_set() and any(ledger.client[i][0] != "OK" for i in ids):
                return


async def _open_stream(stub, ledger: Ledger, outcome: dict) -> None:
    """A stream that sends two items and then neither sends nor half-closes: on SIGTERM it must
    still end with a definite status, not hang until the grace period (or its deadline) runs out."""
    ids = [ledger.new_id("o") for _ in range(2)]
    never = asyncio.Event()

    async def requests():
        for i in ids:
            yield pb.ClassifyRequest(request_id=i, encoded=IMAGE)
        await never.wait()

    try:
        async for answer in stub.ClassifyStream(requests(), timeout=CALL_TIMEOUT_S):
            ledger.client[answer.request_id] = ("OK", "") if answer.WhichOneof("outcome") == "response" else (
                "ITEM_ERROR", answer.error.message)
        outcome["code"] = "OK"
    except grpc.aio.AioRpcError as exc:
        outcome["code"], outcome["details"] = exc.code().name, exc.details()
    outcome["ended"] = time.monotonic()


def _tally(ledger: Ledger, server_codes: dict[str, str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"answered": [], "rejected": [], "lost": []}
    for request_id, (code, details) in ledger.client.items():
        logged = server_codes.get(request_id)
        if code == "OK":
            kind = "answered" if logged in (None, "OK") else "lost"
        elif logged is not None:
            kind = "rejected" if logged == code else "lost"  # the server decided; did the client hear it?
        else:
            kind = "rejected" if code == "UNAVAILABLE" else "lost"  # never reached a handler
        out[kind].append(f"{request_id}: client {code} ({details[:80]}), server {logged}")
    return out


@pytest.mark.parametrize("server_workers", [1, 2])
async def test_sigterm_under_load_loses_no_accepted_request(server_workers: int):
    with ServerProcess(
        "--log.level", "DEBUG", "--grace_seconds", str(GRACE_S), "--batching.max_batch_delay_ms", "20",
        "--workers", str(server_workers),
    ) as server:  # fmt: skip
        ledger, stopping = Ledger(), asyncio.Event()
        # A connection each (one connection reaches one worker): with 16 of them, the chance that
        # two workers do not both get some is 2**-15.
        own_connection = [("grpc.use_local_subchannel_pool", 1)]
        channels = [grpc.aio.insecure_channel(server.address, options=own_connection) for _ in range(16)]
        async with grpc.aio.insecure_channel(server.address) as channel:
            stub = stub_for(channel)
            workers = [asyncio.create_task(_unary_worker(stub_for(c), ledger, stopping)) for c in channels]
            stopping_threads = threading.Event()
            for _ in range(2):
                stream = asyncio.to_thread(_stream_worker, server.address, ledger, stopping_threads)
                workers.append(asyncio.create_task(stream))
            open_stream: dict = {}
            workers.append(asyncio.create_task(_open_stream(stub, ledger, open_stream)))
            # Two seconds of load, and enough of it to mean something however slow this machine is.
            loaded = time.monotonic()
            await eventually(
                lambda: len(ledger.client) > 50 and sum(i.startswith("o-") for i in ledger.client) == 2,
                what="50 calls, and the open stream's two items, answered before SIGTERM",
            )
            await asyncio.sleep(max(0.0, 2.0 - (time.monotonic() - loaded)))
            sent_before_sigterm = len(ledger.client)
            stopping.set()
            stopping_threads.set()
            started = time.monotonic()
            exit_code = await asyncio.to_thread(server.stop, signal.SIGTERM, GRACE_S + 20)
            took = time.monotonic() - started
            await asyncio.wait_for(asyncio.gather(*workers), timeout=120)
        for c in channels:
            await c.close()

    requests = [e for e in server.events_named("request") if "request_id" in e]
    server_codes = {e["request_id"]: e["code"] for e in requests}
    tally = _tally(ledger, server_codes)
    sent = len(ledger.client)
    print(f"\nSIGTERM under load: sent {sent} (before SIGTERM {sent_before_sigterm}), "
          f"answered {len(tally['answered'])}, rejected {len(tally['rejected'])}, lost {len(tally['lost'])}; "
          f"server exited {exit_code} after {took:.1f} s")  # fmt: skip
    assert exit_code == 0
    assert took < GRACE_S + 5
    assert server.events_named("draining") and server.events_named("stopped")
    assert sent_before_sigterm > 50, "too little load to mean anything"
    assert len(tally["answered"]) >= sent_before_sigterm * 0.9
    assert tally["rejected"], "no call came after SIGTERM: the test did not cover the refusal path"
    assert not tally["lost"], "\n".join(tally["lost"][:20])
    # the stream that never half-closed: both items answered, then a definite end, well within grace
    assert open_stream["code"] == "UNAVAILABLE", open_stream
    assert open_stream["ended"] - started < GRACE_S
    if server_workers > 1:  # every worker drained calls of its own
        assert {e.get("worker") for e in requests} == set(range(server_workers))
        assert len(server.events_named("draining")) == server_workers + 1  # and the supervisor


def _hammer(
    address: str, codes: collections.Counter, stop: threading.Event, lock: threading.Lock, options=()
) -> None:
    """One call after another with no pause, a refusal sent straight back: the worst case for a drain."""
    with grpc.insecure_channel(address, options=options) as channel:
        stub = stub_for(channel)
        while not stop.is_set():
            try:
                stub.Classify(pb.ClassifyRequest(encoded=IMAGE), timeout=CALL_TIMEOUT_S)
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
            with lock:
                codes[code] += 1


@pytest.mark.parametrize("server_workers", [1, 2])
def test_sigterm_under_hammering_answers_every_call_ok_or_unavailable_never_cancelled(server_workers: int):
    """Clients that resend at once after each answer always have a call on its way when gRPC stops
    taking calls; such a call must come back UNAVAILABLE (retryable), not CANCELLED. With workers, each
    client has a connection of its own (so both workers are hammered), and a client whose worker closes
    reconnects to the port, where another worker may still be listening."""
    codes: collections.Counter[str] = collections.Counter()
    stop, lock = threading.Event(), threading.Lock()
    # One worker: the threads' channels share one connection (gRPC pools them); two: one each.
    options = [("grpc.use_local_subchannel_pool", 1)] if server_workers > 1 else []
    args = ("--grace_seconds", str(GRACE_S), "--workers", str(server_workers))
    with ServerProcess(*args) as server:
        threads = [
            threading.Thread(target=_hammer, args=(server.address, codes, stop, lock, options))
            for _ in range(24)
        ]
        for thread in threads:
            thread.start()
        try:
            wait_for(lambda: codes["OK"] >= 200, what="200 calls answered (every thread well under way)")
            assert server.stop(signal.SIGTERM, GRACE_S + 30) == 0
            with lock:
                after_exit = sum(codes.values())
            # The port is closed now: keep going until every thread has had refusals from it too.
            wait_for(
                lambda: sum(codes.values()) >= after_exit + 10 * len(threads),
                what="refusals after the exit",
            )
        finally:
            stop.set()
            for thread in threads:
                thread.join(timeout=CALL_TIMEOUT_S)
    assert codes["OK"] >= 200
    assert codes["UNAVAILABLE"] > 0
    assert set(codes) == {"OK", "UNAVAILABLE"}, dict(codes)
