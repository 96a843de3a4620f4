"""The fault matrix: start cbam-serve, drive steady load through the project's client (retries off and
on), inject every fault in turn, count every call, and write docs/RELIABILITY.md's table and a JSON file.

    python scripts/faults.py --workers 1,2            # the long form: docs/RELIABILITY.md's table
    python scripts/faults.py                          # the long form, one server process only
    python scripts/faults.py --short                  # the short form (what CI runs, fault by fault)
    python scripts/faults.py --short --only sigterm,burst --no-doc
    python scripts/faults.py -- --arch cbam_resnet18  # arguments after -- go to the server

The long form with --workers 1,2 is what docs/RELIABILITY.md's table comes from: every fault on one
server process, then on a supervisor with 2 workers; 37 minutes on a quiet 2-core machine (per matrix
a 10-minute soak and some 8 minutes of the other faults). It writes the
table into docs/RELIABILITY.md and every figure into docs/reliability.json. The short form takes about
2 minutes.

Outcomes, faults and targets: docs/RELIABILITY.md. The exit status is 0 when no fault lost more calls
than its target allows, 1 otherwise. Run it from a checkout: the hostile requests are the corpus of
tests/reliability/corpus.py.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import platform
import shlex
import sys
from pathlib import Path

_ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(_ROOT), str(_ROOT / "proto")]

from loadtest.faults import (  # noqa: E402
    FAULTS,
    LONG,
    SHORT,
    FaultResult,
    faults_named,
    markdown_table,
    matrix_server_args,
    replace_table,
    run_matrix,
)
from tests.reliability import corpus  # noqa: E402


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="faults.py",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Arguments after -- go to every `python -m server` the matrix starts.",
    )
    parser.add_argument(
        "--short", action="store_true", help="the short form: seconds per fault, small counts"
    )
    parser.add_argument("--only", help=f"comma-separated faults, of: {', '.join(FAULTS)} (default: all)")
    parser.add_argument(
        "--workers", default="1", help="comma-separated worker counts, one matrix each (default 1)"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=_ROOT / "docs" / "reliability.json",
        help="where the results go as JSON (default docs/reliability.json)",
    )
    parser.add_argument(
        "--doc",
        type=Path,
        default=_ROOT / "docs" / "RELIABILITY.md",
        help="the Markdown file whose fault-matrix table is replaced",
    )
    parser.add_argument(
        "--no-doc", action="store_true", help="print the table, leave the Markdown file alone"
    )
    parser.add_argument("server_args", nargs="*", metavar="-- SERVER_ARG", help="given to every server")
    args = parser.parse_args(argv)
    try:
        args.faults = faults_named(args.only.split(",") if args.only else None)
        args.worker_counts = [int(n) for n in args.workers.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if any(n < 1 for n in args.worker_counts):
        parser.error(f"--workers: counts should be >= 1, got {args.workers}")
    return args


def _machine() -> str:
    load = os.getloadavg()[0]
    return f"{os.cpu_count()} CPUs, {platform.machine()}, Python {platform.python_version()}, load {load:.1f}"


def _progress(result: FaultResult) -> None:
    if result.skipped:
        print(f"{result.name} ({result.service}): skipped: {result.skipped}", flush=True)
        return
    counts = "; ".join(
        f"{p}: {t.sent} sent, {t.ok} OK, {t.refused} refused, {t.client_error} client errors, {t.lost} lost"
        for p, t in result.tallies.items()
    )
    verdict = "" if result.lost_within_target else "  LOST MORE THAN ALLOWED"
    print(f"{result.name} ({result.service}, {result.fault_s:.1f} s): {counts}{verdict}", flush=True)
    for example in result.lost_examples:
        print(f"  lost: {example}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sizes = SHORT if args.short else LONG
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results: list[FaultResult] = []
    for workers in args.worker_counts:
        server_args = matrix_server_args(args.short) + (["--workers", str(workers)] if workers > 1 else [])
        server_args += args.server_args
        results += asyncio.run(
            run_matrix(args.faults, server_args, sizes, hostile=corpus.everything, progress=_progress)
        )
    command = shlex.join(["python", "scripts/faults.py", *(sys.argv[1:] if argv is None else argv)])
    table = markdown_table(results, command=command, when=when, machine=_machine(), short=args.short)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "command": command,
        "when": when,
        "machine": _machine(),
        "short": args.short,
        "faults": [r.as_dict() for r in results],
    }
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    if args.no_doc:
        print(table)
    else:
        replace_table(args.doc, table)
        print(f"table written into {args.doc}")
    print(f"results written to {args.json}")
    return 0 if all(r.lost_within_target for r in results if not r.skipped) else 1


if __name__ == "__main__":
    sys.exit(main())
