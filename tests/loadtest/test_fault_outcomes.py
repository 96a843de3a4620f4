"""The fault matrix's bookkeeping (loadtest/faults): how a call's end is classified, the tallies, the
recovery time, and the table written into docs/RELIABILITY.md. The faults themselves run against real
servers in tests/reliability/test_fault_matrix.py."""

from __future__ import annotations

import grpc
import pytest

from loadtest.faults import FAULT, RETRIES_OFF, RETRIES_ON, FaultResult, Ledger, Tally, categorise
from loadtest.faults._outcomes import CallRecord, recovery_seconds
from loadtest.faults._report import BEGIN, END, markdown_table, replace_table

Code = grpc.StatusCode
ON_PURPOSE = frozenset({Code.OK, Code.DEADLINE_EXCEEDED})


@pytest.mark.parametrize(
    ("code", "details", "expected", "outcome"),
    [
        (Code.OK, "", None, "ok"),
        (Code.RESOURCE_EXHAUSTED, "batch queue is full: 64 requests already waiting", None, "refused"),
        (Code.RESOURCE_EXHAUSTED, "", None, "lost"),  # no reason given: nothing to go on
        (Code.UNAVAILABLE, "the server is shutting down; try another replica", None, "refused"),
        (
            Code.UNAVAILABLE,
            "failed to connect to all addresses; last error: UNKNOWN: ipv4:...",
            None,
            "refused",
        ),
        (Code.UNAVAILABLE, "connections to all backends failing; last error: ...", None, "refused"),
        (Code.UNAVAILABLE, "Received RST_STREAM with error code 7", None, "refused"),
        (Code.UNAVAILABLE, "no cbam-serve replica reachable", None, "refused"),
        (Code.UNAVAILABLE, "Stream removed (recvmsg:Connection reset by peer (104))", None, "lost"),
        (Code.UNAVAILABLE, "Socket closed", None, "lost"),
        (Code.CANCELLED, "Cancelled", None, "lost"),
        (Code.INTERNAL, "internal error (RuntimeError); see the server log", None, "lost"),
        (Code.UNKNOWN, "Unexpected <class 'DecodeError'>", None, "lost"),
        (Code.DEADLINE_EXCEEDED, "Deadline Exceeded", None, "lost"),  # a 60 s deadline: it hung
        (Code.DEADLINE_EXCEEDED, "Deadline Exceeded", ON_PURPOSE, "client_error"),
        (Code.INVALID_ARGUMENT, "image: not a JPEG", frozenset({Code.INVALID_ARGUMENT}), "client_error"),
        (Code.OK, "", frozenset({Code.INVALID_ARGUMENT}), "lost"),  # a broken image answered OK
        (None, "never ended", None, "lost"),
    ],
)
def test_every_end_of_a_call_has_one_outcome(code, details, expected, outcome):
    assert categorise(code, details, *(() if expected is None else (expected,))) == outcome


def _ledger(*records: tuple[str, float, float, str, str]) -> Ledger:
    ledger = Ledger()
    ledger.records = [CallRecord(*r) for r in records]
    return ledger


def test_a_tally_counts_each_populations_calls_once_and_its_p99_per_window():
    ledger = _ledger(
        (RETRIES_OFF, 0.0, 0.01, "OK", "ok"),
        (RETRIES_OFF, 0.5, 0.52, "OK", "ok"),
        (RETRIES_OFF, 1.0, 1.2, "UNAVAILABLE", "refused"),
        (RETRIES_OFF, 1.1, 1.3, "OK", "ok"),
        (RETRIES_ON, 1.1, 1.5, "CANCELLED", "lost"),
        (FAULT, 1.2, 1.25, "DEADLINE_EXCEEDED", "client_error"),
    )
    off = ledger.tally(RETRIES_OFF, before=(0.0, 1.0), during=(1.0, 2.0), end=2.0)
    assert (off.sent, off.ok, off.refused, off.client_error, off.lost) == (4, 3, 1, 0, 0)
    assert off.codes == {"OK": 3, "UNAVAILABLE": 1}
    assert off.p99_before_ms == pytest.approx(19.9)  # of 10 and 20 ms, interpolated
    assert off.p99_during_ms == pytest.approx(200.0)
    on = ledger.tally(RETRIES_ON, before=(0.0, 1.0), during=(1.0, 2.0), end=2.0)
    assert (on.sent, on.lost, on.p99_before_ms) == (1, 1, None)
    fault = ledger.tally(FAULT, before=(0.0, 1.0), during=(1.0, 2.0), end=2.0)
    assert (fault.client_error, fault.p99_during_ms, fault.recovery_s) == (1, None, None)


def test_calls_in_flight_during_a_kill_are_counted_from_their_start_and_end():
    ledger = _ledger(
        (RETRIES_OFF, 0.0, 0.9, "OK", "ok"),  # ended before the kill
        (RETRIES_OFF, 0.5, 1.1, "UNAVAILABLE", "lost"),  # in flight at the signal
        (RETRIES_OFF, 1.15, 1.3, "UNAVAILABLE", "lost"),  # started between the signal and the death
        (RETRIES_OFF, 1.5, 1.6, "UNAVAILABLE", "refused"),  # started after the death
        (RETRIES_ON, 0.5, 1.1, "OK", "ok"),
    )
    assert ledger.overlapping(RETRIES_OFF, 1.0, 1.2) == 2


def test_recovery_is_the_first_second_whose_p99_is_back_near_the_baseline():
    slow = [(RETRIES_OFF, 10.0 + i / 20, 10.0 + i / 20 + 0.5, "OK", "ok") for i in range(20)]  # 10-11 s
    fast = [(RETRIES_OFF, 11.0 + i / 20, 11.0 + i / 20 + 0.01, "OK", "ok") for i in range(40)]  # 11-13 s
    ledger = _ledger(*slow, *fast)
    assert recovery_seconds(ledger, RETRIES_OFF, baseline_p99_s=0.01, after=10.0, end=13.0) == pytest.approx(
        1.0
    )
    assert recovery_seconds(ledger, RETRIES_OFF, baseline_p99_s=0.001, after=10.0, end=13.0) is None


def _result(lost: int, allowed: int) -> FaultResult:
    tally = Tally(sent=10, ok=10 - lost, lost=lost, codes={"OK": 10 - lost}, p99_before_ms=5.0,
                  p99_during_ms=50.0, recovery_s=0.4)  # fmt: skip
    evidence = {"exit_code": -9, "fuzz": {"a": 1}}
    return FaultResult("sigkill", "SIGKILL of the server", "1 process", tallies={RETRIES_OFF: tally},
                       allowed_lost={RETRIES_OFF: allowed}, evidence=evidence)  # fmt: skip


def test_the_table_shows_each_population_and_whether_the_target_was_met():
    met = markdown_table([_result(2, 3)], command="python scripts/faults.py", when="today", machine="here")
    assert (
        "| SIGKILL of the server | 1 process | retries off | 10 | 8 | 0 | 0 | 2 (≤ 3) | 5.0 → 50 | 0.4 s |"
        in met
    )
    assert "exit_code -9" in met and "fuzz" not in met  # structured evidence goes to the JSON only
    assert "lost within target for every fault: **yes**" in met
    missed = markdown_table([_result(4, 3)], command="c", when="w", machine="m")
    assert "4 (≤ 3) ✗" in missed and "**no**" in missed


def test_the_table_replaces_only_its_own_section(tmp_path):
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text(f"intro\n{BEGIN}\nold\n{END}\noutro\n")
    replace_table(doc, "| new |\n")
    assert doc.read_text() == f"intro\n{BEGIN}\n| new |\n{END}\noutro\n"
    doc.write_text("no markers")
    with pytest.raises(ValueError, match="no .* section"):
        replace_table(doc, "| new |\n")
