"""When to retry a failed call, and how long to wait first: capped exponential backoff with jitter."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import grpc

__all__ = ["RetryPolicy"]

_NEVER_RETRIED = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE})


@dataclass(frozen=True)
class RetryPolicy:
    """Bounded retries of calls that failed with a transient status.

    The wait before retry n (n = 1, 2, ...) is drawn uniformly from
    [(1 - jitter) * b, b] with b = min(initial_backoff_seconds * multiplier ** (n - 1), max_backoff_seconds);
    jitter 1.0 is the "full jitter" of gRPC's retry design (A6), which spreads out clients that failed
    together. No retry ever waits past the call's deadline. `rng` makes the waits reproducible in tests.
    """

    max_attempts: int = 5
    initial_backoff_seconds: float = 0.1
    max_backoff_seconds: float = 5.0
    multiplier: float = 2.0
    jitter: float = 1.0
    retry_on: frozenset[grpc.StatusCode] = frozenset(
        {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED}
    )
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts should be >= 1, got {self.max_attempts}")
        if self.initial_backoff_seconds < 0 or self.max_backoff_seconds < 0:
            raise ValueError(
                "backoff seconds should be >= 0, got "
                f"initial {self.initial_backoff_seconds}, max {self.max_backoff_seconds}"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier should be >= 1, got {self.multiplier}")
        if not 0 <= self.jitter <= 1:
            raise ValueError(f"jitter should be in 0..1, got {self.jitter}")
        never = set(self.retry_on) & _NEVER_RETRIED
        if never:
            # A request the server called wrong will be wrong again; retrying only adds load.
            raise ValueError(f"retry_on should not include {sorted(c.name for c in never)}")
        object.__setattr__(self, "retry_on", frozenset(self.retry_on))

    @classmethod
    def none(cls) -> RetryPolicy:
        """One attempt, no retries."""
        return cls(max_attempts=1)

    def should_retry(self, code: grpc.StatusCode, attempt: int) -> bool:
        """Whether attempt number `attempt` (1-based) that failed with `code` may be followed by another."""
        return code in self.retry_on and attempt < self.max_attempts

    def backoff_seconds(self, retry: int) -> float:
        """The wait before retry number `retry` (1-based)."""
        ceiling = min(self.initial_backoff_seconds * self.multiplier ** (retry - 1), self.max_backoff_seconds)
        return ceiling * (1.0 - self.jitter * self.rng.random())
