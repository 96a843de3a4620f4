"""How each call of a fault run ended, and what the matrix reports of them.

Every call lands in one category:

    ok             answered OK (or with the status its caller asked for on purpose, see below)
    refused        refused in a way a client may retry: RESOURCE_EXHAUSTED with a reason, or an
                   UNAVAILABLE that says the call was never taken (the server is draining, no
                   connection could be made, HTTP/2 refused the stream, nginx found no replica)
    client_error   the status the caller provoked on purpose: INVALID_ARGUMENT for the malformed
                   request it sent, DEADLINE_EXCEEDED for the deadline shorter than a batch it set
    lost           anything else: no answer, INTERNAL or UNKNOWN, CANCELLED it did not ask for, an
                   UNAVAILABLE from a connection that broke mid-call (done or not, nobody knows), a
                   status the request could not rightly get
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import grpc
import numpy as np

__all__ = [
    "CATEGORIES",
    "FAULT",
    "GOOD",
    "NO_ANSWER",
    "POPULATIONS",
    "RETRIES_OFF",
    "RETRIES_ON",
    "CallRecord",
    "Ledger",
    "Tally",
    "categorise",
    "p99_ms",
    "recovery_seconds",
]

CATEGORIES = ("ok", "refused", "client_error", "lost")
RETRIES_OFF, RETRIES_ON, FAULT = "retries off", "retries on", "fault's own calls"
POPULATIONS = (RETRIES_OFF, RETRIES_ON, FAULT)
GOOD = frozenset({grpc.StatusCode.OK})  # what a well-formed request with a long deadline may get
NO_ANSWER = "NO_ANSWER"  # the call never ended (the run gave up on it)

# Lower-case pieces of an UNAVAILABLE's message that say the call was never taken.
_NOT_TAKEN = (
    "shutting down",  # the server's own refusal while it drains
    "failed to connect",
    "connections to all backends failing",
    "connection refused",
    "rst_stream with error code 7",  # HTTP/2 REFUSED_STREAM: gRPC core refused it before any handler
    "no cbam-serve replica reachable",  # deploy/nginx: no replica took the call
)


def categorise(
    code: grpc.StatusCode | None, details: str, expected: frozenset[grpc.StatusCode] = GOOD
) -> str:
    """The category of a call that ended with ``code`` (None: no answer) and ``details``, for a
    caller who sent it expecting one of ``expected`` (see the module docstring)."""
    if code is None:
        return "lost"
    if code in expected:
        return "ok" if code is grpc.StatusCode.OK else "client_error"
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED and details:
        return "refused"
    if code is grpc.StatusCode.UNAVAILABLE and any(piece in details.lower() for piece in _NOT_TAKEN):
        return "refused"
    return "lost"


@dataclass(frozen=True)
class CallRecord:
    population: str
    started: float  # time.monotonic()
    ended: float
    code: str  # the status code's name, or NO_ANSWER
    category: str


@dataclass
class Tally:
    """One population's calls in one fault run."""

    sent: int = 0
    ok: int = 0
    refused: int = 0
    client_error: int = 0
    lost: int = 0
    codes: dict[str, int] = field(default_factory=dict)  # final status -> calls
    p99_before_ms: float | None = None  # OK calls started in the baseline window
    p99_during_ms: float | None = None  # OK calls started while the fault was on
    recovery_s: float | None = None  # after the fault: until p99 was back (None: not within the run)

    def as_dict(self) -> dict:
        return dict(self.__dict__)


class _OkCalls:
    """One population's OK calls, in order of their start: the latencies of those started in a window."""

    def __init__(self, records: Iterable[CallRecord]) -> None:
        calls = sorted((r.started, r.ended - r.started) for r in records if r.code == "OK")
        self.starts = np.array([start for start, _ in calls])
        self.latencies = np.array([latency for _, latency in calls])

    def started_within(self, start: float, end: float) -> np.ndarray:
        first, last = np.searchsorted(self.starts, [start, end])
        return self.latencies[first:last]


class Ledger:
    """Every call of one fault run, by population."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self.examples: list[str] = []  # the first few lost calls, described
        self._ok: dict[str, _OkCalls] = {}  # built when first asked for, after the calls

    @staticmethod
    def begin() -> float:
        """A call starts now: its start time (hand it back to ``end``)."""
        return time.monotonic()

    def end(
        self,
        population: str,
        started: float,
        code: grpc.StatusCode | None,
        details: str = "",
        expected: frozenset[grpc.StatusCode] = GOOD,
    ) -> str:
        """The call that ``begin`` started has ended with ``code`` (None: no answer); its category."""
        category = categorise(code, details, expected)
        name = NO_ANSWER if code is None else code.name
        self.records.append(CallRecord(population, started, time.monotonic(), name, category))
        self._ok.clear()
        if category == "lost" and len(self.examples) < 10:
            self.examples.append(f"{population}: {name}: {details[:200]}")
        return category

    def overlapping(self, population: str, start: float, end: float) -> int:
        """Calls of ``population`` in flight at some moment of [start, end]."""
        return sum(
            1 for r in self.records if r.population == population and r.started <= end and r.ended >= start
        )

    def ok_latencies(self, populations: Iterable[str], start: float, end: float) -> np.ndarray:
        """Seconds taken by the OK calls of ``populations`` that started within [start, end)."""
        return np.concatenate([self._ok_calls(p).started_within(start, end) for p in populations])

    def tally(
        self, population: str, before: tuple[float, float], during: tuple[float, float], end: float
    ) -> Tally:
        """``population``'s calls: counted, and p99 in the ``before`` and ``during`` windows (start, end),
        and the recovery after ``during`` (until ``end``)."""
        mine = [r for r in self.records if r.population == population]
        counts = Counter(r.category for r in mine)
        tally = Tally(
            sent=len(mine),
            ok=counts["ok"],
            refused=counts["refused"],
            client_error=counts["client_error"],
            lost=counts["lost"],
            codes=dict(sorted(Counter(r.code for r in mine).items())),
        )
        if population == FAULT:  # its calls are the fault (streams held open...): no latency to compare
            return tally
        tally.p99_before_ms = p99_ms(self.ok_latencies([population], *before))
        tally.p99_during_ms = p99_ms(self.ok_latencies([population], *during))
        if tally.p99_before_ms is not None:
            tally.recovery_s = recovery_seconds(self, population, tally.p99_before_ms / 1000, during[1], end)
        return tally

    def _ok_calls(self, population: str) -> _OkCalls:
        if population not in self._ok:
            self._ok[population] = _OkCalls(r for r in self.records if r.population == population)
        return self._ok[population]


def p99_ms(latencies: np.ndarray) -> float | None:
    """The 99th percentile in milliseconds, or None without latencies."""
    return float(np.percentile(latencies, 99) * 1000) if len(latencies) else None


# Recovery: the first window after the fault whose p99 is within this factor of the baseline's. A p99
# over a second of calls is noisy: an exact match would rarely come on a shared machine.
RECOVERY_TOLERANCE = 1.25
_RECOVERY_WINDOW_S = 1.0
_RECOVERY_STEP_S = 0.1
_RECOVERY_MIN_CALLS = 5


def recovery_seconds(
    ledger: Ledger, population: str, baseline_p99_s: float, after: float, end: float
) -> float | None:
    """Seconds from ``after`` until the p99 of ``population``'s OK calls, over a one-second window, is
    back within RECOVERY_TOLERANCE of ``baseline_p99_s``; None if that did not happen before ``end``."""
    start = after
    while start + _RECOVERY_WINDOW_S <= end:
        latencies = ledger.ok_latencies([population], start, start + _RECOVERY_WINDOW_S)
        if len(latencies) >= _RECOVERY_MIN_CALLS and np.percentile(latencies, 99) <= (
            RECOVERY_TOLERANCE * baseline_p99_s
        ):
            return round(start - after, 2)
        start += _RECOVERY_STEP_S
    return None
