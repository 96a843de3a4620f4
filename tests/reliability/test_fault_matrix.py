"""The fault matrix's short form (loadtest/faults; the long form is scripts/faults.py): each fault injected
into a real server under steady load from the project's client, retries off and on, every call counted.

Each test asserts counts and classifications only: that every call ended in one of the four outcomes,
that none was lost beyond the fault's target, and that the fault really happened (its evidence). Never a
latency or a rate: those are the long form's figures.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loadtest.faults import (
    FAULT,
    RETRIES_OFF,
    RETRIES_ON,
    SHORT,
    FaultResult,
    Service,
    get_fault,
    matrix_server_args,
    nginx_binary,
    run_fault,
)
from loadtest.faults._report import BEGIN, END
from server.launcher import child_env
from tests.reliability import corpus
from tests.support import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

# Whatever the fault, no call of a well-formed request may end like this (unless the process was killed).
NEVER = {"CANCELLED", "INTERNAL", "UNKNOWN", "NO_ANSWER"}
# What a fuzzed body may get, by name (loadtest/faults' FUZZ_EXPECTED): never INTERNAL or UNKNOWN.
FUZZ_EXPECTED_NAMES = {"OK", "INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "UNIMPLEMENTED"}


@pytest.fixture(scope="module")
def service():
    """One server for the module, as the matrix runs it; the faults that stop it restart it."""
    with Service(matrix_server_args(short=True)) as s:
        yield s


def _accounted(result: FaultResult) -> None:
    """Every call is in exactly one outcome, the steady load ran, and nothing beyond the target was lost."""
    assert result.skipped is None
    for population, t in result.tallies.items():
        assert t.sent == t.ok + t.refused + t.client_error + t.lost, (population, t)
        assert sum(t.codes.values()) == t.sent, (population, t)
    for population in (RETRIES_OFF, RETRIES_ON):
        assert result.tallies[population].ok > 0, f"no steady {population} call succeeded"
    assert result.lost_within_target, (result.tallies, result.allowed_lost, result.lost_examples)
    assert result.evidence["served_after"], "the steady load got no OK calls after the fault"


async def _run(name: str, service, **kwargs) -> FaultResult:
    result = await run_fault(get_fault(name), service, SHORT, **kwargs)
    print(f"{name}: {[(p, t.codes) for p, t in result.tallies.items()]}; {result.evidence}")
    _accounted(result)
    return result


async def test_sigterm_under_load_answers_or_refuses_every_call_and_cancels_none(service):
    result = await _run("sigterm", service)
    assert result.evidence["exit_code"] == 0 and result.evidence["drained"], result.evidence
    for population, t in result.tallies.items():
        assert t.lost == 0 and not NEVER & set(t.codes), (population, t.codes)
    # The drain and the restart refused calls (retryable): the refusal path was covered.
    assert result.tallies[RETRIES_OFF].refused > 0, result.tallies


async def test_sigkill_loses_at_most_the_calls_in_flight_and_none_with_retries(service):
    result = await _run("sigkill", service)
    assert result.evidence["exit_code"] == -9, result.evidence
    assert result.tallies[RETRIES_ON].lost == 0, result.lost_examples
    assert result.tallies[RETRIES_OFF].lost <= result.allowed_lost[RETRIES_OFF]
    assert not NEVER & set(result.tallies[RETRIES_ON].codes)


@pytest.fixture(scope="module")
def workers():
    """A supervisor and 2 workers, as `scripts/faults.py --workers 2` runs them."""
    with Service([*matrix_server_args(short=True), "--workers", "2"]) as s:
        yield s


async def test_sigkill_of_one_worker_is_restarted_by_the_supervisor_and_loses_nothing_with_retries(workers):
    result = await _run("sigkill", workers)
    # The worker killed was answering calls of the load (the kernel may give another no connection).
    assert result.evidence["its_share_of_calls"] > 0, result.evidence
    assert result.evidence["killed_worker_pid"] not in workers.worker_pids(), result.evidence
    assert len(workers.worker_pids()) == 2
    assert result.tallies[RETRIES_ON].lost == 0, result.lost_examples
    assert result.tallies[RETRIES_OFF].lost <= result.allowed_lost[RETRIES_OFF]
    assert not NEVER & set(result.tallies[RETRIES_ON].codes), result.tallies[RETRIES_ON].codes


async def test_sigterm_drains_every_worker_and_cancels_nothing(workers):
    result = await _run("sigterm", workers)
    assert result.evidence["exit_code"] == 0 and result.evidence["drained"], result.evidence
    assert result.evidence["workers_stopped"] == 2, result.evidence
    for population, t in result.tallies.items():
        assert t.lost == 0 and not NEVER & set(t.codes), (population, t.codes)


async def test_a_burst_of_ten_times_the_queue_is_answered_or_refused_and_nothing_lost(service):
    result = await _run("burst", service)
    burst = result.tallies[FAULT]
    assert burst.sent == 10 * result.evidence["queue"] == result.evidence["burst"]
    assert burst.ok > 0 and burst.lost == 0
    assert set(burst.codes) <= {"OK", "RESOURCE_EXHAUSTED", "UNAVAILABLE"}, burst.codes


async def test_a_thousand_idle_streams_are_held_and_end_ok(service):
    result = await _run("idle-streams", service)
    assert result.evidence["held_open"] == 1000
    assert result.tallies[FAULT].codes == {"OK": 1000}


async def test_clients_that_stop_reading_get_every_item_answered_once_they_read(service):
    result = await _run("slow-readers", service)
    items = result.tallies[FAULT]
    assert items.sent > 0 and items.lost == 0 and items.ok > 0
    assert result.evidence["answered_when_reading_stopped"] > 0


async def test_deadlines_shorter_than_a_batch_are_the_callers_own_errors(service):
    result = await _run("short-deadlines", service)
    short = result.tallies[FAULT]
    assert short.sent == SHORT.short_deadline_calls
    assert set(short.codes) <= {"OK", "DEADLINE_EXCEEDED"} and short.lost == 0, short.codes


async def test_a_model_fault_in_one_batch_costs_no_answer(service):
    result = await _run("model-fault", service)
    assert "InjectedFault" in result.evidence["error"] and result.evidence["failed_batch_size"] >= 1
    for population, t in result.tallies.items():
        assert t.lost == 0 and set(t.codes) <= {"OK", "RESOURCE_EXHAUSTED"}, (population, t.codes)


async def test_hostile_and_fuzzed_messages_get_clear_statuses_and_good_traffic_is_untouched(service):
    result = await _run("hostile", service, hostile=corpus.everything)
    hostile = result.tallies[FAULT]
    assert result.evidence["corpus_cases"] > 50 and result.evidence["fuzzed_bodies"] > 0
    assert hostile.lost == 0 and hostile.client_error > 0
    fuzzed = result.evidence["fuzz_answers"]
    inference = {f"/cbam.v1.InferenceService/{m}" for m in ("Classify", "ClassifyStream", "ClassifyBatch")}
    others = {"/cbam.v1.InferenceService/GetModelInfo", "/grpc.health.v1.Health/Check"}
    assert inference | others <= set(fuzzed), sorted(fuzzed)
    assert any("ServerReflection" in method for method in fuzzed), sorted(fuzzed)
    for method, codes in fuzzed.items():  # every method the server lists, each with its own verdicts
        assert sum(codes.values()) == SHORT.fuzz_per_method, (method, codes)
        assert set(codes) <= FUZZ_EXPECTED_NAMES, (method, codes)
    for method in inference:  # these bytes cannot all be valid requests: some were refused as such
        assert fuzzed[method].get("INVALID_ARGUMENT", 0) > 0, (method, fuzzed[method])
    assert result.evidence["health_after"] == "SERVING"
    assert result.tallies[RETRIES_OFF].lost == result.tallies[RETRIES_ON].lost == 0


async def test_a_short_soak_loses_nothing_and_reports_the_servers_memory(service):
    result = await _run("soak", service)
    assert result.evidence["rss_start_mb"] > 0 and result.evidence["seconds"] >= SHORT.soak_s
    assert "rss_slope_mb_per_min" in result.evidence


async def test_a_replica_removed_behind_nginx_loses_nothing():
    if nginx_binary() is None:
        pytest.skip("nginx is not installed: run `bash scripts/setup.sh --test`")
    from loadtest.faults import Balanced

    with Balanced(matrix_server_args(short=True), nginx_binary()) as balanced:
        result = await _run("replica-removed", balanced)
        assert balanced.replicas[0].server.process.returncode == 0  # drained and gone
    assert result.evidence["exit_code"] == 0
    for population, t in result.tallies.items():
        assert t.lost == 0 and not NEVER & set(t.codes), (population, t.codes)


def test_the_script_writes_the_table_and_the_json(tmp_path):
    """scripts/faults.py itself, short, one fault: its exit status, JSON and the table in the document."""
    doc = tmp_path / "RELIABILITY.md"
    doc.write_text(f"# Reliability\n\nbefore\n\n{BEGIN}\nold table\n{END}\n\nafter\n")
    report = tmp_path / "faults.json"
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "faults.py"), "--short", "--only", "short-deadlines",
         "--json", str(report), "--doc", str(doc)],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=280,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    written = json.loads(report.read_text())
    (fault,) = written["faults"]
    assert fault["name"] == "short-deadlines" and fault["lost_within_target"] is True
    assert set(fault["populations"]) == {RETRIES_OFF, RETRIES_ON, FAULT}
    text = doc.read_text()
    assert "old table" not in text and text.startswith("# Reliability\n\nbefore") and text.endswith("after\n")
    assert "deadlines shorter than a batch" in text and "scripts/faults.py --short" in text


def test_an_unknown_fault_is_refused_naming_the_choices():
    done = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "faults.py"), "--only", "meteor"],
        cwd=ROOT, env=child_env(), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2 and "meteor" in done.stderr and "sigterm" in done.stderr
