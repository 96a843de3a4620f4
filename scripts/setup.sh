#!/usr/bin/env bash
# Sets up a fresh machine for cbam-serve: a virtual environment at .venv with torch and the project.
# Idempotent: re-running it only installs what is missing.
#   bash scripts/setup.sh          runtime + the dev extra (training, load-test, onnx, test tools)
#   bash scripts/setup.sh --test   also installs the real servers the tests start (prometheus, nginx),
#                                  the browser that opens the attention gallery (chromium) and the load
#                                  generator of cbam-bench --peers (h2load)
set -euo pipefail
cd "$(dirname "$0")/.."

python3 -m venv .venv
# torch first, pinned: an open-ended `torch` would resolve a several-GB CUDA build.
# 2.13.0 is the CPU wheel this machine carries; the project itself accepts torch>=2.4.
.venv/bin/pip install --quiet --disable-pip-version-check "torch==${CBAM_TORCH_VERSION:-2.13.0}"
.venv/bin/pip install --quiet --disable-pip-version-check -e '.[dev]'

if [[ "${1:-}" == "--test" ]]; then
  missing=()
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v nginx >/dev/null || missing+=(nginx-light)
  [[ -x /usr/bin/chromium ]] || missing+=(chromium)
  command -v h2load >/dev/null || missing+=(nghttp2-client)  # cbam-bench --peers' load generator
  if (( ${#missing[@]} )); then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi
