#!/usr/bin/env bash
# The GPU check, as one command on a lent GPU machine (see NOTES.md beside this file):
# the GPU tests, the kernel sweep and the resample/preprocess benchmarks.
# Usage, from the repository root: bash benchmarks/gpu/check.sh OUT_DIR
set -uo pipefail
out=${1:?usage: check.sh OUT_DIR}
mkdir -p "$out"
# packages the machine's image lacks travel as wheels in .whl/ (pydantic, torchinterp1d)
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/workloads/src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda,
              'triton', triton.__version__, 'numpy', numpy.__version__)"
  echo "== GPU tests, and the kernel's CUDA compilation and autotuning path"
  timeout 240 python3 -m pytest -q -p no:cacheprovider tests/workloads \
    -k "gpu or cuda or offline or vector_loads or autotuned or windowed"
  echo "== kernel sweep"
  timeout 240 python3 benchmarks/gpu/sweep.py "$out/sweep.json"
  echo "== benchmarks"
  timeout 300 python3 -m trajflow.cli bench ${BENCHES:-resample preprocess} --out "$out"
} 2>&1 | grep -v '^{"ts"' | tee "$out/log.txt"
