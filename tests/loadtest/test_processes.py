"""Load from several processes, merged into one result (loadtest/_processes.py); the GPU check's dry
run (test_gpu_check.py) drives a real server through it."""

from __future__ import annotations

import collections

import numpy as np
import pytest

from loadtest._processes import LoadProcesses, merge_results
from loadtest._served import LoadResult, ServerCounters


def _result(concurrency: int, seconds: float, calls: int, code: str | None = None) -> LoadResult:
    errors = collections.Counter({code: 1} if code else {})
    latencies = [0.010 * (i + 1) for i in range(calls)]
    return LoadResult(concurrency, seconds, 1, calls, latencies, [1] * calls, errors, None)


def test_merged_generators_add_their_throughput_calls_and_errors() -> None:
    first, second = _result(2, 2.0, 40), _result(3, 2.5, 50, "UNAVAILABLE")
    # Only the first process reads the server's counters: 7 forwards of 3.5 images on average.
    first.before = ServerCounters(10.0, 4.0, 0.1, {"": 10.0})
    first.after = ServerCounters(34.5, 11.0, 0.3, {"": 34.5})
    merged = merge_results([first, second]).summary()
    assert merged["concurrency"] == 5 and merged["requests"] == 90
    assert merged["throughput"] == pytest.approx(40 / 2.0 + 50 / 2.5)
    assert merged["errors"] == 1 and merged["error_codes"] == {"UNAVAILABLE": 1}
    assert merged["mean_batch_size"] == 3.5 and merged["mean_batch_size_source"] == "metrics"
    assert merged["p50"] == pytest.approx(np.median(first.latencies + second.latencies) * 1000)
    same = merge_results([_result(1, 2.0, 10), _result(1, 2.0, 30)])
    assert same.seconds == pytest.approx(2.0)  # windows of one length keep it


def test_a_pool_must_be_entered_and_have_a_process() -> None:
    with pytest.raises(ValueError, match="processes should be >= 1"):
        LoadProcesses(0)
    with pytest.raises(RuntimeError, match="context manager"):
        LoadProcesses(2).drive("127.0.0.1:1", b"", concurrency=1, seconds=1, warmup_seconds=0)
