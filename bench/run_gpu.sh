#!/usr/bin/env bash
# The GPU variant of the in-process benchmark as one bounded run, for a machine with CUDA
# (and, for comparison, the CPU variant on that machine's host CPUs).
# Usage, from the repository root: bench/run_gpu.sh OUT_DIR
# Needs python3 with torch (CUDA), numpy, onnx and onnxruntime. The package is used from
# the source tree (PYTHONPATH), so nothing is installed; GRADTRUST_SOURCE=DIR puts another
# copy of the gradtrust package first (to compare a modified copy).
set -uo pipefail
out=${1:?usage: bench/run_gpu.sh OUT_DIR}
mkdir -p "$out"
src=${GRADTRUST_SOURCE:+$GRADTRUST_SOURCE:}
export PYTHONPATH="$src$PWD/server:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
{
  nvidia-smi || true
  nproc
  free -m
  "$py" -c "import torch, onnxruntime, numpy, gradtrust.core.scores as s; print('torch', \
torch.__version__, torch.cuda.is_available(), 'onnxruntime', onnxruntime.__version__, \
onnxruntime.get_available_providers(), 'numpy', numpy.__version__, 'scores from', s.__file__)"
} >"$out/env.txt" 2>&1
timeout 300 "$py" -m bench.inprocess --gpu only --out "$out" 2>&1 | tee "$out/run.log"
timeout 200 "$py" -m bench.inprocess --gpu off --tag host --out "$out" 2>&1 | tee -a "$out/run.log"
