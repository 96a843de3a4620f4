"""The matrix's results as a Markdown table (docs/RELIABILITY.md holds one) and as JSON."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from ._matrix import RECOVERY_TARGET_S, RSS_GROWTH_TARGET_PCT, FaultResult
from ._outcomes import RECOVERY_TOLERANCE

__all__ = ["BEGIN", "END", "markdown_table", "replace_table"]

BEGIN = "<!-- fault matrix: begin (scripts/faults.py writes what is between these lines) -->"
END = "<!-- fault matrix: end -->"


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f}" if value >= 10 else f"{value:.1f}"


def _lost(lost: int, allowed: int) -> str:
    mark = "" if lost <= allowed else " ✗"
    return f"{lost}{mark}" if not allowed else f"{lost} (≤ {allowed}){mark}"


def _recovery(seconds: float | None, p99_before: float | None) -> str:
    if p99_before is None:
        return "–"
    return "not within the run" if seconds is None else f"{seconds:.1f} s"


def _facts(evidence: dict) -> str:
    """The evidence's plain values (the JSON file has the rest)."""
    return ", ".join(f"{k} {v}" for k, v in evidence.items() if not isinstance(v, (dict, list)))


def markdown_table(
    results: Sequence[FaultResult], *, command: str, when: str, machine: str, short: bool = False
) -> str:
    """One row per fault and population of calls, then what each fault observed."""
    lines = [f"Made by `{command}` on {when} ({machine})."]
    if short:
        lines.append(
            "The short form: its counts show every fault ran and what it cost in calls; its seconds of "
            "load per fault make no figures (p99, recovery, the soak's memory): the long form does."
        )
    lines += [
        "",
        "| fault | service | calls | sent | OK | refused, retryable | client errors | lost (target) "
        "| p99 ms before → during | p99 back after | server RSS MB before → after |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for result in results:
        if result.skipped:
            lines.append(f"| {result.title} | {result.service} | skipped: {result.skipped} | | | | | | | | |")
            continue
        first = True
        for population, t in result.tallies.items():
            lead = f"{result.title} | {result.service}" if first else " | "
            rss = f"{result.rss_before_mb:,.0f} → {result.rss_after_mb:,.0f}" if first else ""
            lines.append(
                f"| {lead} | {population} | {t.sent:,} | {t.ok:,} | {t.refused:,} | {t.client_error:,} "
                f"| {_lost(t.lost, result.allowed_lost.get(population, 0))} "
                f"| {_ms(t.p99_before_ms)} → {_ms(t.p99_during_ms)} "
                f"| {_recovery(t.recovery_s, t.p99_before_ms)} "
                f"| {rss} |"
            )
            first = False
    lines += ["", "What each fault observed (its evidence that it happened):", ""]
    for result in results:
        if not result.skipped:
            lines.append(
                f"- **{result.name}** ({result.service}, {result.fault_s:.1f} s): {_facts(result.evidence)}"
            )
    lines += _fuzz_answers(results)
    lost_ok = all(r.lost_within_target for r in results if not r.skipped)
    recovered = [r.recovered_within_target for r in results if not r.skipped]
    soaks = [
        f"{r.service} ({r.evidence['seconds']:.0f} s): {r.evidence['rss_growth_pct']:+.2f} %, "
        f"slope {r.evidence['rss_slope_mb_per_min']:+.3f} MB/min"
        for r in results
        if r.name == "soak" and not r.skipped
    ]
    lines += [
        "",
        f"Targets: lost within target for every fault: **{'yes' if lost_ok else 'no'}**; "
        f"p99 back within {RECOVERY_TOLERANCE:g}× its value before the fault within {RECOVERY_TARGET_S:g} s: "
        f"**{sum(r is True for r in recovered)} of {sum(r is not None for r in recovered)} faults**"
        + (
            f"; RSS growth over the soak (target < {RSS_GROWTH_TARGET_PCT:g} %): {'; '.join(soaks)}."
            if soaks
            else "."
        ),
    ]
    return "\n".join(lines) + "\n"


def _fuzz_answers(results: Sequence[FaultResult]) -> list[str]:
    """Per method, the statuses its fuzzed bodies got (the hostile fault's evidence)."""
    runs = [r for r in results if not r.skipped and "fuzz_answers" in r.evidence]
    if not runs:
        return []
    lines = [
        "",
        "Fuzzed protobuf bodies, per method, and the statuses they got (the target: an answer, or a status "
        "that blames the bytes such as INVALID_ARGUMENT, or UNIMPLEMENTED; never INTERNAL or UNKNOWN):",
        "",
    ]
    lines += ["| service | method | bodies | statuses |", "| --- | --- | ---: | --- |"]
    for result in runs:
        for method, codes in result.evidence["fuzz_answers"].items():
            statuses = ", ".join(f"{code} {count:,}" for code, count in sorted(codes.items()))
            lines.append(f"| {result.service} | `{method}` | {sum(codes.values()):,} | {statuses} |")
    return lines


def replace_table(document: Path, table: str) -> None:
    """Put ``table`` between BEGIN and END in ``document`` (which must hold both)."""
    text = document.read_text(encoding="utf-8")
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise ValueError(f"{document} has no {BEGIN!r} ... {END!r} section to write the table into")
    document.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text), encoding="utf-8")
