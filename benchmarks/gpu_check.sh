#!/usr/bin/env bash
# The CUDA check (benchmarks/gpu_check.py), on a GPU machine with torch and no network, from the checkout's root:
#   bash benchmarks/gpu_check.sh
# scl is installed from the checkout without dependencies (that machine's image holds torch, peft, onnx, onnxruntime,
# h5py, scikit-learn, pandas); results go to $OUT when set (the device tool brings them back), else benchmarks/results.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/scl-site . >/dev/null
export PYTHONPATH=/tmp/scl-site PYTHONUNBUFFERED=1
timeout 290 python3 benchmarks/gpu_check.py
