#!/usr/bin/env bash
# GPU readiness (issue 19): run unchanged on a machine with one NVIDIA GPU, in under 10 minutes.
#   bench/gpu.sh                 # Llama-3.2-1B- and Llama-3.1-8B-shaped RMs, bf16: peak, parity, serving vs naive
#   bench/gpu.sh --smoke         # the tiny shape on whatever device there is (what the test suite runs on CPU)
# Uses the python3 that holds a CUDA torch (GPU images ship one) and the repository's sources on PYTHONPATH, so
# nothing is built. Packages the image lacks (fastapi, uvicorn, pydantic, pydantic-settings, ...) are installed from
# wheels in .whl/ when that folder exists (no network on such machines; see docs/prefix.md for how to fetch them).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/rk-site .whl/*.whl
  export PYTHONPATH="/tmp/rk-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/core:$PWD/server:$PWD/clients/python:$PWD/training${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
"$PY" - <<'PYCHECK'
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "fastapi", "uvicorn", "pydantic", "pydantic_settings", "httpx",
                       "prometheus_client", "safetensors", "tokenizers") if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"missing Python packages: {missing}; carry their wheels in .whl/ (docs/prefix.md, GPU readiness)")
PYCHECK
if [ "${1:-}" != "--smoke" ]; then nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true; fi
timeout 590 "$PY" bench/gpu_bench.py "$@"
