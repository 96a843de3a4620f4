import random

import grpc
import pytest

from client import RetryPolicy


def test_backoff_grows_exponentially_up_to_the_cap_without_jitter():
    policy = RetryPolicy(initial_backoff_seconds=0.1, multiplier=2, max_backoff_seconds=0.5, jitter=0.0)
    assert [policy.backoff_seconds(n) for n in range(1, 6)] == pytest.approx([0.1, 0.2, 0.4, 0.5, 0.5])


def test_full_jitter_draws_from_zero_to_the_exponential_ceiling_reproducibly():
    def policy():
        rng = random.Random(7)
        return RetryPolicy(initial_backoff_seconds=1, multiplier=3, max_backoff_seconds=99, rng=rng)

    first, again = policy(), policy()
    waits = [first.backoff_seconds(n) for n in range(1, 5)]
    assert waits == [again.backoff_seconds(n) for n in range(1, 5)]
    expected_rng = random.Random(7)
    assert waits == pytest.approx([3 ** (n - 1) * (1 - expected_rng.random()) for n in range(1, 5)])
    for n, wait in enumerate(waits, start=1):
        assert 0 < wait <= 3 ** (n - 1)


def test_partial_jitter_stays_within_its_band():
    policy = RetryPolicy(initial_backoff_seconds=1.0, jitter=0.25, rng=random.Random(1))
    waits = [policy.backoff_seconds(1) for _ in range(200)]
    assert min(waits) > 0.75 and max(waits) <= 1.0
    assert max(waits) - min(waits) > 0.2  # it does spread


def test_retries_only_transient_codes_and_only_up_to_max_attempts():
    policy = RetryPolicy(max_attempts=3)
    assert policy.should_retry(grpc.StatusCode.UNAVAILABLE, 1)
    assert policy.should_retry(grpc.StatusCode.RESOURCE_EXHAUSTED, 2)
    assert not policy.should_retry(grpc.StatusCode.UNAVAILABLE, 3)
    assert not policy.should_retry(grpc.StatusCode.INVALID_ARGUMENT, 1)
    assert not policy.should_retry(grpc.StatusCode.DEADLINE_EXCEEDED, 1)
    assert not RetryPolicy.none().should_retry(grpc.StatusCode.UNAVAILABLE, 1)


def test_invalid_argument_can_never_be_made_retryable():
    with pytest.raises(ValueError, match="INVALID_ARGUMENT"):
        RetryPolicy(retry_on=frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT}))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_attempts": 0}, "max_attempts should be >= 1, got 0"),
        ({"jitter": 1.5}, "jitter should be in 0..1"),
        ({"multiplier": 0.5}, "multiplier should be >= 1"),
        ({"initial_backoff_seconds": -1}, "backoff seconds"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RetryPolicy(**kwargs)
