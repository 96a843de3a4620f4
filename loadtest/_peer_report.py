"""What the peer comparison reports: per-server figures over the rounds, the paired ratios, whether the run
can be trusted, and the targets judged only when it can.
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass

from rich.table import Table

from ._report import _number, verdict

__all__ = ["TARGETS", "Target", "judge", "peer_table", "ratios", "summarise", "trust"]

MIN_ROUNDS = 3  # fewer rounds give no spread worth the name
SPREAD_LIMIT = 1.25  # one server's best round over its worst, at one concurrency
OTHER_CPU_LIMIT = 0.25  # cores busy with anything but the server measured and the load generator


@dataclass(frozen=True)
class Target:
    """cbam-serve's throughput over `peer`'s at `concurrency` should be at least `ratio`; with `ahead`,
    strictly above it and with the lower median latency too."""

    peer: str
    concurrency: int
    ratio: float
    ahead: bool = False

    def describe(self) -> str:
        if self.ahead:
            return f"ahead of {self.peer} at concurrency {self.concurrency} (more req/s, lower p50)"
        return f"cbam-serve / {self.peer} >= {self.ratio:g}x req/s at concurrency {self.concurrency}"


TARGETS = (  # issue 13, part 3: with defaults only
    Target("triton", 32, 1.25),
    Target("torchserve", 32, 1.5),
    Target("triton", 1, 1.0, ahead=True),
    Target("torchserve", 1, 1.0, ahead=True),
)


def summarise(rows: list[dict]) -> list[dict]:
    """Per server and concurrency, over the rounds: median req/s with its range and spread (best round
    over worst), median p50 and p99, errors, and the CPU the server and everything else used."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["server"], row["concurrency"]), []).append(row)
    summary = []
    for (server, concurrency), mine in groups.items():
        throughput = [r["throughput"] for r in mine]
        summary.append(
            {
                "server": server,
                "concurrency": concurrency,
                "rounds": len(mine),
                "throughput": statistics.median(throughput),
                "throughput_min": min(throughput),
                "throughput_max": max(throughput),
                "spread": max(throughput) / min(throughput) if min(throughput) > 0 else None,
                "p50": _median(r["p50"] for r in mine),
                "p99": _median(r["p99"] for r in mine),
                "errors": sum(r["errors"] for r in mine),
                "server_cores": _median(r["server_cores"] for r in mine),
                "other_cores_max": max(
                    (r["other_cores"] for r in mine if r["other_cores"] is not None), default=None
                ),
            }
        )
    return summary


def ratios(rows: list[dict], ours: str = "cbam-serve") -> list[dict]:
    """cbam-serve's req/s over each peer's, paired round by round at each concurrency: median and range;
    and the peer's median p50 over ours (above 1: we answer sooner)."""
    by_key = {(r["round"], r["server"], r["concurrency"]): r for r in rows}
    peers = sorted({r["server"] for r in rows} - {ours}, key=[r["server"] for r in rows].index)
    out = []
    for peer in peers:
        for concurrency in sorted({r["concurrency"] for r in rows}):
            pairs = [
                (by_key[(n, ours, concurrency)], by_key[(n, peer, concurrency)])
                for n in sorted({r["round"] for r in rows})
                if (n, ours, concurrency) in by_key and (n, peer, concurrency) in by_key
            ]
            paired = [a["throughput"] / b["throughput"] for a, b in pairs if b["throughput"] > 0]
            p50 = [b["p50"] / a["p50"] for a, b in pairs if a["p50"] and b["p50"]]
            out.append(
                {
                    "peer": peer,
                    "concurrency": concurrency,
                    "ratio": statistics.median(paired) if paired else None,
                    "ratio_min": min(paired, default=None),
                    "ratio_max": max(paired, default=None),
                    "p50_ratio": statistics.median(p50) if p50 else None,
                    "rounds": len(paired),
                }
            )
    return out


def trust(rows: list[dict], summary: list[dict], rounds: int) -> list[str]:
    """Why the figures should not be trusted; empty when nothing says so."""
    reasons = []
    if rounds < MIN_ROUNDS:
        reasons.append(f"only {rounds} round(s); at least {MIN_ROUNDS} give a spread")
    for entry in summary:
        label = f"{entry['server']} at concurrency {entry['concurrency']}"
        if entry["spread"] is None:
            reasons.append(f"{label} answered nothing in some round")
        elif entry["spread"] > SPREAD_LIMIT:
            reasons.append(
                f"{label}: rounds differ by {entry['spread']:.2f}x "
                f"({entry['throughput_min']:.1f} to {entry['throughput_max']:.1f} req/s; "
                f"limit {SPREAD_LIMIT}x)"
            )
        if entry["errors"]:
            reasons.append(f"{label}: {entry['errors']} answers were errors")
    busiest = max(
        (r for r in rows if r["other_cores"] is not None), key=lambda r: r["other_cores"], default=None
    )
    if busiest is not None and busiest["other_cores"] > OTHER_CPU_LIMIT:
        reasons.append(
            f"other processes used up to {busiest['other_cores']:.2f} cores during a window "
            f"({busiest['server']}, concurrency {busiest['concurrency']}, round {busiest['round'] + 1}; "
            f"limit {OTHER_CPU_LIMIT})"
        )
    for row in rows:
        if row.get("count_mismatch"):
            reasons.append(
                f"{row['server']}, concurrency {row['concurrency']}, round {row['round'] + 1}: "
                f"{row['count_mismatch']}"
            )
    return reasons


def judge(ratio_rows: list[dict], reasons: list[str], targets=TARGETS) -> list[dict]:
    """Each target with its figure; met is None (no verdict) when the run is not to be trusted or the
    figure was not measured."""
    by_key = {(r["peer"], r["concurrency"]): r for r in ratio_rows}
    judged = []
    for target in targets:
        figure = by_key.get((target.peer, target.concurrency))
        ratio = None if figure is None else figure["ratio"]
        p50_ratio = None if figure is None else figure["p50_ratio"]
        met = None
        if ratio is not None and not reasons:
            if target.ahead:
                met = ratio > target.ratio and p50_ratio is not None and p50_ratio > 1.0
            else:
                met = ratio >= target.ratio
        judged.append(
            {
                **asdict(target),
                "target": target.describe(),
                "ratio": ratio,
                "ratio_min": None if figure is None else figure["ratio_min"],
                "ratio_max": None if figure is None else figure["ratio_max"],
                "p50_ratio": p50_ratio,
                "met": met,
            }
        )
    return judged


def peer_table(summary: list[dict], title: str) -> Table:
    table = Table(
        title=title,
        caption="req/s: median of the rounds (range); p50/p99 in ms, medians of the rounds; cores: CPU "
        "used during the window by the server / by everything else",
    )
    columns = ("server", "c", "req/s", "range", "spread", "p50", "p99", "errors", "server cores", "other")
    for name in columns:
        table.add_column(name, justify="left" if name == "server" else "right", no_wrap=True)
    for entry in sorted(summary, key=lambda e: (e["concurrency"], e["server"] != "cbam-serve")):
        table.add_row(
            entry["server"],
            str(entry["concurrency"]),
            f"{entry['throughput']:.1f}",
            f"{entry['throughput_min']:.1f}-{entry['throughput_max']:.1f}",
            "-" if entry["spread"] is None else f"{entry['spread']:.2f}x",
            _number(entry["p50"], "{:.1f}"),
            _number(entry["p99"], "{:.1f}"),
            str(entry["errors"]) if not entry["errors"] else f"[red]{entry['errors']}[/red]",
            _number(entry["server_cores"], "{:.2f}"),
            _number(entry["other_cores_max"], "{:.2f}"),
        )
    return table


def describe_judgement(item: dict) -> str:
    """One target's line: the figure with its range, then the verdict (rich markup)."""
    if item["ratio"] is None:
        return f"{item['target']}: {verdict(None)}"
    figure = f"{item['ratio']:.2f}x ({item['ratio_min']:.2f}-{item['ratio_max']:.2f})"
    if item["ahead"] and item["p50_ratio"] is not None:
        figure += (
            f", p50 {item['p50_ratio']:.2f}x lower"
            if item["p50_ratio"] >= 1
            else (f", p50 {1 / item['p50_ratio']:.2f}x higher")
        )
    judged = verdict(item["met"]) if item["met"] is not None else "[yellow]no verdict[/yellow]"
    return f"{item['target']}: {figure}: {judged}"


def _median(values) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None
