#!/usr/bin/env bash
# Prepares .whl/: the Python wheels the GPU check needs on the lent GPU machine, which reaches no package
# registry. Its python3 (3.12, x86-64) already has CUDA torch, numpy, Pillow, safetensors, PyYAML, rich,
# onnx, onnxruntime, pytest and the rest of /work/.library/device/KINDS.md's list; carried here are the
# packages missing there, and grpcio and protobuf, which the stubs generated in proto/ need at least as
# new as the grpcio-tools that made them. Each at the version this checkout's .venv has, so the
# machine runs what the tests here ran.
#   bash scripts/gpu_wheels.sh           download them into .whl/ (git ignores it; the device call carries it)
#   bash scripts/gpu_wheels.sh --print   only print NAME==VERSION, one a line
# PYTHON chooses the interpreter whose versions are copied (default .venv/bin/python).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-.venv/bin/python}"
NAMES=(
  grpcio protobuf grpcio-health-checking grpcio-reflection           # the stubs, health, reflection
  pydantic pydantic-core pydantic-settings annotated-types typing-inspection python-dotenv
  typing-extensions                                                  # pydantic-core needs >= 4.16
  prometheus-client                                                  # the version the metrics code is tested on
  pytest-asyncio                                                     # pyproject's asyncio_mode
)
pins=$("$python" - "${NAMES[@]}" <<'PY'
import sys
from importlib.metadata import version
for name in sys.argv[1:]:
    print(f"{name}=={version(name)}")
PY
)
if [[ "${1:-}" == "--print" ]]; then
  echo "$pins"
  exit 0
fi

rm -rf .whl && mkdir .whl  # one version of each: two would stop the install there
# shellcheck disable=SC2086  # one argument per pin
"$python" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $pins
ls -1 .whl
tree_kib=$(git ls-files -z | xargs -0 du -ck 2>/dev/null | tail -1 | cut -f1)
wheels_kib=$(du -sk .whl | cut -f1)
echo "wheels: $((wheels_kib / 1024)) MiB; with the tracked files ($((tree_kib / 1024)) MiB) the device call" \
  "sends $(((tree_kib + wheels_kib) / 1024)) MiB of its 64 MiB"
