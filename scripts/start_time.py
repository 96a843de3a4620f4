"""Time to SERVING, per backend, on a cold and then a warm artefact cache.

    .venv/bin/python scripts/start_time.py                                   # default model, every backend
    .venv/bin/python scripts/start_time.py --arch cbam_resnet50 --backend onnxruntime --backend compile
    .venv/bin/python scripts/start_time.py --json out/start.json --server-arg=--batching.max_batch_size \
        --server-arg=8

For each backend: a fresh `cbam-serve` (`python -m server`, loopback, port 0) with an empty
`model.cache_dir` (cold: nothing exported or compiled yet), stopped, then started again with the same
directory (warm). The figure is the wall time from launching the process to its "serving" log line:
imports, model load, the backend's build (export, compilation, or their cached artefacts), the check
against eager and the warm-up of every batch bucket. The cache directories are temporary, so the
user's own cache is neither used nor touched.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "proto")]

from server.backends import backend_choices, list_backends  # noqa: E402
from server.launcher import ServerProcess  # noqa: E402


def time_to_serving(flags: list[str], timeout: float) -> float:
    started = time.monotonic()
    with ServerProcess(*flags, startup_timeout=timeout):
        return time.monotonic() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", help="serve this architecture, random weights (default: the default model)")
    parser.add_argument("--backend", action="append", choices=backend_choices(),
                        help=f"repeat for several (default: {', '.join(list_backends())})")  # fmt: skip
    parser.add_argument("--timeout", type=float, default=1800, help="longest wait for one start, seconds")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="one more cbam-serve argument (repeat it)")  # fmt: skip
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    backends = args.backend or list_backends()
    rows = []
    for backend in backends:
        with tempfile.TemporaryDirectory(prefix="cbam-start-") as cache:
            flags = ["--model.backend", backend, "--model.cache_dir", cache, "--metrics.enabled", "false"]
            flags += (["--arch", args.arch] if args.arch else []) + args.server_arg
            row = {"backend": backend, "load_average": os.getloadavg()[0]}
            for state in ("cold", "warm"):
                seconds = row[f"{state}_seconds"] = round(time_to_serving(flags, args.timeout), 1)
                print(f"{args.arch or 'default model'}, {backend}, {state} cache: {seconds} s", flush=True)
            rows.append(row)
    print("\n| model | backend | cold cache | warm cache |\n| --- | --- | ---: | ---: |")
    for row in rows:
        cold, warm = row["cold_seconds"], row["warm_seconds"]
        print(f"| {args.arch or 'default'} | {row['backend']} | {cold} s | {warm} s |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        report = {"arch": args.arch or "default", "server_args": args.server_arg, "rows": rows}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
