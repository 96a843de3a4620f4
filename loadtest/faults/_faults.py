"""The faults of the matrix, one class each, in the registry ``FAULTS`` (in the order they run).

A fault's ``inject(run)`` does its harm while the steady load runs, and returns once the harm is over
(the server restarted, the burst answered, the streams closed): the run's "during" window. Calls the
fault makes itself are counted too (population "fault's own calls"), each with the outcomes its caller
may rightly expect. ``allowed_lost(run)`` is the target: no call lost, except where a process is killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc

from ._fuzz import Method, examples, fuzzed_bodies, served_methods
from ._load import CALL_TIMEOUT_S
from ._outcomes import FAULT, GOOD, POPULATIONS, RETRIES_OFF, Ledger
from ._service import Balanced, Service

__all__ = ["FAULTS", "Fault", "FaultRun", "HostileCase", "Sizes", "get_fault"]

OK, DEADLINE_EXCEEDED = grpc.StatusCode.OK, grpc.StatusCode.DEADLINE_EXCEEDED
# What fuzzed bytes may rightly get: an answer (they made a valid request), or a status that blames
# them; UNIMPLEMENTED too, for a method a service lists but the server does not offer (grpc's asyncio
# health servicer has no Health/List).
FUZZ_EXPECTED = frozenset(
    {
        OK,
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.OUT_OF_RANGE,
        grpc.StatusCode.UNIMPLEMENTED,
    }
)
_UNLIMITED = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]
_CALLS_PER_CONNECTION = 100  # well under the server's limits.max_concurrent_streams (256)
_WAIT_S = 300.0  # for a condition the fault waits on: only a broken server takes this long
_FORWARD_FAILED = "forward failed, running the batch once more"  # server/runner.py's log event


@dataclass(frozen=True)
class Sizes:
    """How much of everything a run does: the short form (CI) and the long form (the figures)."""

    callers: int  # steady callers per population (retries off, retries on)
    connections: int  # per population
    baseline_s: float  # steady load before the fault (at least; and min_ok OK calls)
    after_s: float  # steady load after it (at least; and min_ok OK calls)
    min_ok: int
    burst_factor: int  # a burst of this many times the server's queue size
    idle_streams: int
    idle_hold_s: float
    slow_readers: int
    slow_items: int  # each slow reader sends at most this many images
    slow_hold_s: float
    short_deadline_calls: int
    fuzz_per_method: int
    soak_s: float


class HostileCase(Protocol):
    """A malformed or odd request and the statuses that are a correct reaction to it
    (tests/reliability/corpus.py's Case)."""

    request: pb.ClassifyRequest
    expect: frozenset[grpc.StatusCode]


@dataclass
class FaultRun:
    """What a fault acts on while it is injected, and what it found."""

    service: Service | Balanced
    ledger: Ledger
    info: pb.ModelInfo
    image: bytes  # a PNG at the model's input size
    sizes: Sizes
    baseline_p50_s: float  # of the steady calls before the fault
    hostile: Callable[[pb.ModelInfo], list[HostileCase]] | None = None
    evidence: dict = field(default_factory=dict)  # facts the fault observed (that it happened)
    kill_window: tuple[float, float] | None = None  # a process killed: from the signal to its death

    async def record(
        self, call: Awaitable, expected: frozenset[grpc.StatusCode] = GOOD, what: str = ""
    ) -> grpc.StatusCode:
        """Await one of the fault's own calls (``what`` it was, for the examples of lost calls) and count
        it; its status."""
        started = self.ledger.begin()
        code, details = await _outcome(call)
        self.ledger.end(FAULT, started, code, f"{what}: {details}" if what else details, expected)
        return code

    @contextlib.asynccontextmanager
    async def channels(self, count: int) -> AsyncIterator[list[grpc.aio.Channel]]:
        """``count`` connections of their own to the service."""
        channels = [
            grpc.aio.insecure_channel(self.service.target, options=_UNLIMITED + _OWN_CONNECTION)
            for _ in range(count)
        ]
        try:
            yield channels
        finally:
            for channel in channels:
                await channel.close()


def _connections_for(calls: int) -> int:
    """Connections enough for ``calls`` at once, each well under the server's concurrent streams."""
    return max(1, math.ceil(calls / _CALLS_PER_CONNECTION))


async def _outcome(call: Awaitable) -> tuple[grpc.StatusCode, str]:
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def _stub(channel: grpc.aio.Channel) -> inference_pb2_grpc.InferenceServiceStub:
    return inference_pb2_grpc.InferenceServiceStub(channel)


async def _wait(condition: Callable[[], object], what: str, timeout: float = _WAIT_S) -> None:
    """Poll ``condition`` (in a thread: it may scrape /metrics) until it holds."""
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(condition):
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        await asyncio.sleep(0.05)


class Fault:
    """One fault: ``name`` (for --only), ``title`` (for the table), and what it does."""

    name = ""
    title = ""
    balanced = False  # runs on nginx in front of two replicas, not on the matrix's own server

    async def inject(self, run: FaultRun) -> None:
        raise NotImplementedError

    def allowed_lost(self, run: FaultRun) -> dict[str, int]:
        """The most calls of each population that may be lost: none, unless said otherwise."""
        return dict.fromkeys(POPULATIONS, 0)


FAULTS: dict[str, Fault] = {}


def _register(cls: type[Fault]) -> type[Fault]:
    if cls.name in FAULTS:
        raise ValueError(f"fault {cls.name!r} is already registered")
    FAULTS[cls.name] = cls()
    return cls


def get_fault(name: str) -> Fault:
    if name not in FAULTS:
        raise ValueError(f"unknown fault {name!r}; choose from {list(FAULTS)}")
    return FAULTS[name]


async def _stop_and_restart(run: FaultRun, sig: int) -> tuple[float, float]:
    """Stop the server with ``sig``, note how it ended, start it again (on its port): when the signal
    went, and when the server had exited."""
    service = run.service
    signalled = time.monotonic()
    code = await asyncio.to_thread(service.stop, sig)
    exited = time.monotonic()
    drained = bool(service.events("draining")) and bool(service.events("stopped"))
    run.evidence.update(exit_code=code, drained=drained, exit_s=round(exited - signalled, 2))
    if service.workers > 1:  # each worker logs its own "stopped" (with its index) once it has drained
        stopped = {event["worker"] for event in service.events("stopped") if "worker" in event}
        run.evidence["workers_stopped"] = len(stopped)
    await asyncio.to_thread(service.start)
    run.evidence["restart_s"] = round(time.monotonic() - exited, 2)
    return signalled, exited


@_register
class Sigterm(Fault):
    name = "sigterm"
    title = "SIGTERM under load (drain), then a restart"

    async def inject(self, run: FaultRun) -> None:
        await _stop_and_restart(run, signal.SIGTERM)


@_register
class Sigkill(Fault):
    name = "sigkill"
    title = "SIGKILL of the server (restarted by the matrix) or of one worker (by its supervisor)"

    async def inject(self, run: FaultRun) -> None:
        if run.service.workers > 1:
            await self._kill_a_worker(run, run.service)
        else:
            run.kill_window = await _stop_and_restart(run, signal.SIGKILL)

    async def _kill_a_worker(self, run: FaultRun, service: Service) -> None:
        restarts = await asyncio.to_thread(service.sample, "cbam_worker_restarts_total")
        # The kernel spreads connections over the workers by a hash: kill the one that answers the
        # most of the load now, not one that may hold no connection at all.
        before = await asyncio.to_thread(service.per_worker, "cbam_requests_total")
        growth: dict[str, float] = {}

        def answering() -> bool:
            now = service.per_worker("cbam_requests_total")
            growth.update({w: now[w] - before.get(w, 0.0) for w in now})
            return any(g > 0 for g in growth.values())

        await _wait(answering, "the workers answering the load")
        index = max(growth, key=growth.__getitem__)
        victim = service.worker_pid(index)
        killed = time.monotonic()
        os.kill(victim, signal.SIGKILL)
        await _wait(lambda: service.sample("cbam_worker_restarts_total") > restarts, "the worker's restart")
        run.kill_window = (killed, time.monotonic())  # it died somewhere in there
        await _wait(
            lambda: service.sample("cbam_workers", state="serving") == service.workers,
            "every worker serving again",
        )
        run.evidence.update(
            killed_worker=index,
            killed_worker_pid=victim,
            its_share_of_calls=round(growth[index] / sum(growth.values()), 2),
            restart_s=round(time.monotonic() - killed, 2),
        )

    def allowed_lost(self, run: FaultRun) -> dict[str, int]:
        # Without retries, at most the calls that were in flight while the process died; with the
        # client's retries, none: they are sent again (a classification is safe to repeat).
        allowed = super().allowed_lost(run)
        if run.kill_window is not None:
            allowed[RETRIES_OFF] = run.ledger.overlapping(RETRIES_OFF, *run.kill_window)
        return allowed


@_register
class Burst(Fault):
    name = "burst"
    title = "a burst of 10x the queue size"

    async def inject(self, run: FaultRun) -> None:
        queue = run.info.batching.max_queue
        count = run.sizes.burst_factor * queue
        request = pb.ClassifyRequest(encoded=run.image, top_k=1)
        overloaded = await asyncio.to_thread(
            run.service.sample, "cbam_dropped_requests_total", reason="overloaded"
        )
        async with run.channels(_connections_for(count)) as channels:
            stubs = [_stub(channel) for channel in channels]
            calls = [stubs[i % len(stubs)].Classify(request, timeout=CALL_TIMEOUT_S) for i in range(count)]
            await asyncio.gather(*(run.record(call) for call in calls))
        after = await asyncio.to_thread(
            run.service.sample, "cbam_dropped_requests_total", reason="overloaded"
        )
        run.evidence.update(queue=queue, burst=count, refused_as_overloaded=int(after - overloaded))


async def _silent(until: asyncio.Event) -> AsyncIterator[pb.ClassifyRequest]:
    """A request stream that sends nothing until ``until`` is set, then ends (half-closes)."""
    await until.wait()
    for request in ():  # an async generator that yields nothing
        yield request


async def _read_all(call) -> int:
    """Read a stream's answers to its end; how many there were."""
    return sum([1 async for _ in call])


@_register
class IdleStreams(Fault):
    name = "idle-streams"
    title = "1,000 concurrent idle streams"

    async def inject(self, run: FaultRun) -> None:
        count = run.sizes.idle_streams
        opened = await asyncio.to_thread(
            run.service.sample, "grpc_server_started_total", grpc_method="ClassifyStream"
        )
        release = asyncio.Event()
        async with run.channels(_connections_for(count)) as channels:
            stubs = [_stub(channel) for channel in channels]
            calls = [
                stubs[i % len(stubs)].ClassifyStream(_silent(release), timeout=CALL_TIMEOUT_S)
                for i in range(count)
            ]
            streams = [asyncio.create_task(run.record(_read_all(call))) for call in calls]

            def all_open() -> bool:
                started = run.service.sample("grpc_server_started_total", grpc_method="ClassifyStream")
                return started - opened >= count

            await _wait(all_open, f"the server to hold {count} idle streams")
            run.evidence["held_open"] = count
            await asyncio.sleep(run.sizes.idle_hold_s)
            release.set()  # each stream half-closes with nothing sent, and ends OK
            await asyncio.gather(*streams)


@_register
class SlowReaders(Fault):
    name = "slow-readers"
    title = "clients that stop reading"

    async def inject(self, run: FaultRun) -> None:
        stop_sending = asyncio.Event()
        started: dict[str, float] = {}  # request id -> when it was handed to gRPC
        # Answers with every attention map are large: the windows and buffers fill after fewer items.
        attention = pb.AttentionRequest(kind=pb.ATTENTION_KIND_BOTH, format=pb.ATTENTION_FORMAT_FLOAT16)

        async def requests(reader: int) -> AsyncIterator[pb.ClassifyRequest]:
            for item in range(run.sizes.slow_items):
                if stop_sending.is_set():
                    return
                request_id = f"slow{reader}-{item}"
                started[request_id] = run.ledger.begin()
                yield pb.ClassifyRequest(request_id=request_id, encoded=run.image, attention=attention)

        def answered() -> float:
            return run.service.sample("cbam_requests_total", method="ClassifyStream", code="OK")

        before = await asyncio.to_thread(answered)
        async with run.channels(run.sizes.slow_readers) as channels:  # one each
            calls = [
                _stub(channel).ClassifyStream(requests(i), timeout=CALL_TIMEOUT_S)
                for i, channel in enumerate(channels)
            ]
            await _wait(lambda: answered() > before, "the slow readers' first answers")
            at_stall = await asyncio.to_thread(answered)
            await asyncio.sleep(run.sizes.slow_hold_s)  # nobody reads meanwhile
            at_resume = await asyncio.to_thread(answered)
            stop_sending.set()
            await asyncio.gather(*(self._read(run, i, call, started) for i, call in enumerate(calls)))
        for request_id in list(started):  # handed to gRPC, never answered
            run.ledger.end(FAULT, started.pop(request_id), None, f"stream item {request_id} never answered")
        run.evidence.update(
            readers=len(calls),
            answered_when_reading_stopped=int(at_stall - before),
            answered_while_nobody_read=int(at_resume - at_stall),
        )

    @staticmethod
    async def _read(run: FaultRun, reader: int, call, started: dict[str, float]) -> None:
        try:
            async for answer in call:
                if answer.WhichOneof("outcome") == "response":
                    code, details = OK, ""
                else:
                    code = _CODES.get(answer.error.code, grpc.StatusCode.UNKNOWN)
                    details = answer.error.message
                run.ledger.end(FAULT, started.pop(answer.request_id), code, details)
        except grpc.aio.AioRpcError as exc:  # this stream's items still unanswered end with it
            for request_id in [r for r in started if r.startswith(f"slow{reader}-")]:
                run.ledger.end(FAULT, started.pop(request_id), exc.code(), exc.details() or "")


_CODES = {code.value[0]: code for code in grpc.StatusCode}


@_register
class ShortDeadlines(Fault):
    name = "short-deadlines"
    title = "deadlines shorter than a batch"

    async def inject(self, run: FaultRun) -> None:
        # Half the median call before the fault: shorter than a batch's queueing and forward.
        deadline = max(0.001, run.baseline_p50_s / 2)
        request = pb.ClassifyRequest(encoded=run.image, top_k=1)
        expected = frozenset({OK, DEADLINE_EXCEEDED})
        dropped = await asyncio.to_thread(
            run.service.sample, "cbam_dropped_requests_total", reason="deadline"
        )
        wave = 16
        async with run.channels(1) as (channel,):
            stub = _stub(channel)
            for first in range(0, run.sizes.short_deadline_calls, wave):
                count = min(wave, run.sizes.short_deadline_calls - first)
                await asyncio.gather(
                    *(run.record(stub.Classify(request, timeout=deadline), expected) for _ in range(count))
                )
        after = await asyncio.to_thread(run.service.sample, "cbam_dropped_requests_total", reason="deadline")
        run.evidence.update(
            deadline_ms=round(deadline * 1000, 2), dropped_before_compute=int(after - dropped)
        )


@_register
class ModelFault(Fault):
    name = "model-fault"
    title = "a model fault injected into one batch"

    async def inject(self, run: FaultRun) -> None:
        service = run.service
        logged = len(service.events(_FORWARD_FAILED))
        # debug.fail_batch_on_sigusr1: the next forward of that process raises once. Every worker gets
        # one: which of them the load's connections reached is the kernel's choice.
        targets = service.worker_pids() or [service.pid]
        for pid in targets:
            os.kill(pid, signal.SIGUSR1)
        await _wait(lambda: len(service.events(_FORWARD_FAILED)) > logged, "the injected fault")
        event = service.events(_FORWARD_FAILED)[logged]
        run.evidence.update(
            processes_signalled=len(targets),
            failed_batch_size=event.get("batch_size"),
            error=event.get("error"),
        )


@_register
class ReplicaRemoved(Fault):
    name = "replica-removed"
    title = "a replica removed (SIGTERM) behind nginx"
    balanced = True

    async def inject(self, run: FaultRun) -> None:
        doomed = run.service.replicas[0]
        signalled = time.monotonic()
        code = await asyncio.to_thread(doomed.stop, signal.SIGTERM)
        run.evidence.update(exit_code=code, drain_s=round(time.monotonic() - signalled, 2))


async def _fuzzed_call(channel: grpc.aio.Channel, method: Method, body: bytes) -> None:
    """Call ``method`` with raw ``body``; raises AioRpcError as a call does.

    A request stream sends the one body: had it more, the server may end the stream on the first
    (INVALID_ARGUMENT) while the client still writes, and grpc.aio then reports "Internal error from
    Core" in place of the server's status (grpc/grpc#36066, client/_async.py).
    """
    path, timeout = method.path, CALL_TIMEOUT_S
    if not method.client_streaming and not method.server_streaming:
        await channel.unary_unary(path)(body, timeout=timeout)
    elif method.client_streaming and not method.server_streaming:
        await channel.stream_unary(path)(iter([body]), timeout=timeout)
    elif method.client_streaming:
        await _read_all(channel.stream_stream(path)(iter([body]), timeout=timeout))
    else:  # a server stream may never end (health Watch): its first answer will do
        call = channel.unary_stream(path)(body, timeout=timeout)
        first = await call.read()
        if first is grpc.aio.EOF:
            await call  # its status
        call.cancel()


@_register
class Hostile(Fault):
    name = "hostile"
    title = "oversized and malformed messages mixed into good traffic"

    async def inject(self, run: FaultRun) -> None:
        cases = run.hostile(run.info) if run.hostile is not None else []
        methods = await asyncio.to_thread(served_methods, run.service.target)
        bodies = await asyncio.to_thread(
            lambda: [
                (m, body)
                for i, m in enumerate(methods)
                for body in examples(fuzzed_bodies(m.request), run.sizes.fuzz_per_method, seed=i)
            ]
        )
        at_once = asyncio.Semaphore(8)
        answers: dict[str, Counter[str]] = {m.path: Counter() for m in methods}

        async def corpus_case(stub, case: HostileCase) -> None:
            async with at_once:
                call = stub.Classify(case.request, timeout=CALL_TIMEOUT_S)
                await run.record(call, case.expect, f"corpus case {case.request.request_id!r}")

        async def fuzzed(channel: grpc.aio.Channel, method: Method, body: bytes) -> None:
            async with at_once:
                code = await run.record(_fuzzed_call(channel, method, body), FUZZ_EXPECTED, method.path)
                answers[method.path][code.name] += 1

        async with run.channels(1) as (channel,):
            stub = _stub(channel)
            await asyncio.gather(
                *(corpus_case(stub, case) for case in cases),
                *(fuzzed(channel, m, body) for m, body in bodies),
            )
            health = health_pb2_grpc.HealthStub(channel)
            status = await health.Check(health_pb2.HealthCheckRequest(), timeout=CALL_TIMEOUT_S)
        run.evidence.update(
            corpus_cases=len(cases),
            fuzzed_bodies=len(bodies),
            methods_fuzzed=len(methods),
            health_after=health_pb2.HealthCheckResponse.ServingStatus.Name(status.status),
            fuzz_answers={path: dict(codes) for path, codes in answers.items()},
        )


@_register
class Soak(Fault):
    name = "soak"
    title = "a soak: steady load alone, the server's memory sampled every second"

    async def inject(self, run: FaultRun) -> None:
        start = time.monotonic()
        samples: list[tuple[float, float]] = []
        while True:
            now = time.monotonic()
            samples.append((now - start, await asyncio.to_thread(run.service.rss_mb)))
            if now - start >= run.sizes.soak_s:
                break
            await asyncio.sleep(min(1.0, start + run.sizes.soak_s - now))
        seconds = np.array([t for t, _ in samples])
        rss = np.array([r for _, r in samples])
        slope = float(np.polyfit(seconds, rss, 1)[0] * 60) if len(samples) > 2 else 0.0
        run.evidence.update(
            seconds=round(float(seconds[-1]), 1),
            rss_start_mb=round(float(rss[0]), 1),
            rss_end_mb=round(float(rss[-1]), 1),
            rss_growth_pct=round(float((rss[-1] - rss[0]) / rss[0] * 100), 2),
            rss_slope_mb_per_min=round(slope, 3),
        )
