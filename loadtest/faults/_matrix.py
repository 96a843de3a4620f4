"""One fault under steady load, counted: ``run_fault``; every fault in turn: ``run_matrix``.

    steady load (retries off | retries on) ......................................................
    |-- baseline: at least baseline_s and min_ok OK calls --|-- fault --|-- after: the same --|
                                        RSS before ^                     RSS after (load stopped) ^

Then every call has ended (or is counted as having no answer), and each population is tallied.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np

from cbam.v1 import inference_pb2 as pb
from cbam.v1 import inference_pb2_grpc

from ._faults import FAULTS, Fault, FaultRun, HostileCase, Sizes
from ._load import SteadyLoad, picture_png
from ._outcomes import POPULATIONS, RETRIES_OFF, RETRIES_ON, Ledger, Tally
from ._service import Balanced, Service, nginx_binary

__all__ = ["LONG", "SHORT", "FaultResult", "matrix_server_args", "run_fault", "run_matrix"]

SHORT = Sizes(
    callers=3,
    connections=2,
    baseline_s=0.5,
    after_s=0.5,
    min_ok=5,
    burst_factor=10,
    idle_streams=1000,
    idle_hold_s=0.5,
    slow_readers=2,
    slow_items=300,
    slow_hold_s=1.0,
    short_deadline_calls=48,
    fuzz_per_method=12,
    soak_s=2.0,
)
LONG = Sizes(
    callers=8,
    connections=4,
    baseline_s=10.0,
    after_s=10.0,
    min_ok=20,
    burst_factor=10,
    idle_streams=1000,
    idle_hold_s=10.0,
    slow_readers=4,
    slow_items=20_000,
    slow_hold_s=10.0,
    short_deadline_calls=2000,
    fuzz_per_method=300,
    soak_s=600.0,
)
RECOVERY_TARGET_S = 5.0
RSS_GROWTH_TARGET_PCT = 5.0
_READY_TIMEOUT_S = 300.0  # for the load to get its OK calls: only a broken server takes this long


def matrix_server_args(short: bool) -> list[str]:
    """What the matrix adds to the server's arguments: the fault-injection switch (a SIGUSR1 does
    nothing else), and in the short form a smaller queue, so that its burst is smaller too: 4,000
    calls, still above the 3,000 that gRPC core's default backlog would have held."""
    args = ["--debug.fail_batch_on_sigusr1", "true"]
    return args + ["--batching.max_queue", "400"] if short else args


@dataclass
class FaultResult:
    """One fault's run: each population's calls, what the fault observed, and the targets."""

    name: str
    title: str
    service: str  # what it ran on, in words
    tallies: dict[str, Tally] = field(default_factory=dict)
    allowed_lost: dict[str, int] = field(default_factory=dict)
    evidence: dict = field(default_factory=dict)
    fault_s: float = 0.0
    rss_before_mb: float = 0.0
    rss_after_mb: float = 0.0
    lost_examples: list[str] = field(default_factory=list)
    skipped: str | None = None  # why it did not run

    @property
    def lost_within_target(self) -> bool:
        return all(t.lost <= self.allowed_lost.get(p, 0) for p, t in self.tallies.items())

    @property
    def recovered_within_target(self) -> bool | None:
        """p99 back within RECOVERY_TARGET_S for both steady populations; None where not measured."""
        times = [self.tallies[p].recovery_s for p in (RETRIES_OFF, RETRIES_ON) if p in self.tallies]
        if not times:
            return None
        return all(t is not None and t <= RECOVERY_TARGET_S for t in times)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "title": self.title,
            "service": self.service,
            "skipped": self.skipped,
            "populations": {p: t.as_dict() for p, t in self.tallies.items()},
            "allowed_lost": self.allowed_lost,
            "lost_within_target": self.lost_within_target if not self.skipped else None,
            "recovered_within_target": self.recovered_within_target,
            "fault_s": round(self.fault_s, 2),
            "rss_before_mb": round(self.rss_before_mb, 1),
            "rss_after_mb": round(self.rss_after_mb, 1),
            "evidence": self.evidence,
            "lost_examples": self.lost_examples,
        }


def _model_info(target: str) -> pb.ModelInfo:
    with grpc.insecure_channel(target) as channel:
        return inference_pb2_grpc.InferenceServiceStub(channel).GetModelInfo(
            pb.GetModelInfoRequest(), timeout=60
        )


def _describe(service: Service | Balanced) -> str:
    if isinstance(service, Balanced):
        return f"nginx + 2 replicas of {_describe(service.replicas[0])}"
    return f"{service.workers} workers" if service.workers > 1 else "1 process"


async def run_fault(
    fault: Fault,
    service: Service | Balanced,
    sizes: Sizes,
    *,
    hostile: Callable[[pb.ModelInfo], list[HostileCase]] | None = None,
) -> FaultResult:
    """Inject ``fault`` into ``service`` under steady load and count every call (see the module doc)."""
    ledger = Ledger()
    info = await asyncio.to_thread(_model_info, service.target)
    image = picture_png(info.input_height, info.input_width)
    result = FaultResult(fault.name, fault.title, _describe(service))
    async with SteadyLoad(
        service.target, image, ledger, callers=sizes.callers, connections=sizes.connections
    ) as load:
        # Warm-up, not measured: new connections, and a server that may have just started.
        if not await load.wait_for_ok(sizes.min_ok, _READY_TIMEOUT_S):
            raise RuntimeError(f"{fault.name}: no OK calls before the fault: {ledger.examples[:3]}")
        baseline_start = time.monotonic()
        await asyncio.sleep(sizes.baseline_s)
        await load.wait_for_ok(sizes.min_ok, _READY_TIMEOUT_S)
        started = time.monotonic()
        baseline = ledger.ok_latencies((RETRIES_OFF, RETRIES_ON), baseline_start, started)
        if not len(baseline):
            raise RuntimeError(f"{fault.name}: no OK calls in the baseline: {ledger.examples[:3]}")
        p50 = float(np.median(baseline))
        run = FaultRun(service, ledger, info, image, sizes, p50, hostile)
        result.rss_before_mb = service.rss_mb()
        await fault.inject(run)
        ended = time.monotonic()
        await asyncio.sleep(sizes.after_s)
        served_after = await load.wait_for_ok(sizes.min_ok, _READY_TIMEOUT_S)
        end = time.monotonic()
    result.rss_after_mb = service.rss_mb()
    result.fault_s = ended - started
    result.tallies = {
        p: ledger.tally(p, (baseline_start, started), (started, ended), end) for p in POPULATIONS
    }
    result.tallies = {p: t for p, t in result.tallies.items() if t.sent}  # a fault without calls of its own
    result.allowed_lost = fault.allowed_lost(run)
    result.evidence = {**run.evidence, "served_after": served_after}
    result.lost_examples = ledger.examples
    return result


async def run_matrix(
    faults: Sequence[Fault],
    server_args: Sequence[str],
    sizes: Sizes,
    *,
    hostile: Callable[[pb.ModelInfo], list[HostileCase]] | None = None,
    progress: Callable[[FaultResult], None] = lambda result: None,
) -> list[FaultResult]:
    """Each of ``faults`` in turn, on one server with ``server_args`` (restarted by the faults that
    stop it); a fault that needs nginx gets nginx and two replicas of its own, or is skipped without
    nginx. ``progress`` is told each result as it comes."""
    results = []
    with Service(server_args) as service:
        for fault in faults:
            if fault.balanced:
                result = await _on_balanced(fault, server_args, sizes)
            else:
                result = await run_fault(fault, service, sizes, hostile=hostile)
            progress(result)
            results.append(result)
    return results


async def _on_balanced(fault: Fault, server_args: Sequence[str], sizes: Sizes) -> FaultResult:
    nginx = nginx_binary()
    if nginx is None:
        why = "nginx is not installed (bash scripts/setup.sh --test installs nginx-light)"
        return FaultResult(fault.name, fault.title, "nginx + 2 replicas", skipped=why)
    with Balanced(server_args, nginx) as balanced:
        return await run_fault(fault, balanced, sizes)


def faults_named(names: Sequence[str] | None) -> list[Fault]:
    """The faults called ``names`` (all, in their order, for None)."""
    if names is None:
        return list(FAULTS.values())
    from ._faults import get_fault

    return [get_fault(name) for name in names]
