#!/usr/bin/env bash
# The GPU check in one command (docs/PERFORMANCE.md, "The GPU check"): tests marked cuda, in-process
# ceilings, cbam-serve on the GPU under load, one JSON report (loadtest/gpu_check.py says what is in it).
#   bash scripts/gpu_check.sh --wheels .whl --out "$OUT"   on the lent GPU machine: downloads nothing
#   bash scripts/gpu_check.sh --dry-run --out out/check     the same steps on this CPU, tiny counts
# --wheels DIR: install the wheels that scripts/gpu_wheels.sh prepared into a private folder, put ahead
# of the machine's own packages. Every other argument goes to `python -m loadtest.gpu_check`.
# PYTHON chooses the interpreter (default python3: on the GPU machine, the one with CUDA torch).
# Exit status: 0 all steps passed, 1 some step failed (the report names it), 2 CUDA asked for but
# absent, 3 the carried wheels would not install.
set -uo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
wheels=""
args=()
while (($#)); do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done

# What the machine itself has, before the carried wheels take over: the stubs in proto/ need
# grpcio >= 1.85.1 and protobuf >= 7.35.1 (their generated code refuses older ones as it loads).
echo "gpu-check: $("$python" -c 'import sys; print(sys.executable, sys.version.split()[0])')"
"$python" - <<'PY'
from importlib import metadata
found = []
for name in ("torch", "grpcio", "protobuf", "pydantic", "pydantic-settings", "grpcio-health-checking",
             "prometheus-client", "onnxruntime", "pytest", "pytest-asyncio"):
    try:
        found.append(f"{name} {metadata.version(name)}")
    except metadata.PackageNotFoundError:
        found.append(f"{name} MISSING")
print("gpu-check: the machine's own packages:", ", ".join(found))
PY

if [[ -n "$wheels" ]]; then
  site="${TMPDIR:-/tmp}/cbam-gpu-check-site"
  shopt -s nullglob
  carried=("$wheels"/*.whl)
  if ((${#carried[@]} == 0)); then
    echo "gpu-check: no wheels in $wheels (run bash scripts/gpu_wheels.sh where pip can download)" >&2
    exit 3
  fi
  echo "gpu-check: installing ${#carried[@]} carried wheels into $site"
  "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$site" "${carried[@]}" || { echo "gpu-check: the carried wheels did not install" >&2; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The sources themselves, uninstalled: the servers and pytest started from here import them too.
export PYTHONPATH="$PWD:$PWD/proto${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$python" -m loadtest.gpu_check ${args[@]+"${args[@]}"}
