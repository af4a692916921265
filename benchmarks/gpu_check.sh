#!/usr/bin/env bash
# Everything GPU-side in one call, for an environment that already has a CUDA torch and dlo installed:
# the gpu-marked tests (compiled Triton kernels vs torch twins, fp32/bf16/fp16, and a routed model's forward and
# backward with DLO_KERNELS=triton against the torch path), then the benchmarks at GPU sizes.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]      # default runs/gpu; logs and JSON land there
#
# Each stage runs even if an earlier one failed; the exit status is that of the first failure.
set -uo pipefail
OUT=${1:-runs/gpu}
PY=${PYTHON:-python}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # compiled kernels only: the interpreter would test nothing GPU-side
status=0

stage() {  # stage NAME CMD...: run CMD, log to OUT/NAME.log, remember the first failure
    local name=$1
    shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    if [ "$rc" -ne 0 ] && [ "$status" -eq 0 ]; then status=$rc; fi
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.csv"
stage gpu-tests "$PY" -m pytest -q -m gpu tests/test_kernels_gpu.py
stage kernels "$PY" benchmarks/kernels.py --out "$OUT/kernels.json"
stage layer "$PY" benchmarks/layer.py --capacities 1.0 0.5 0.25 --out "$OUT/layer.json"
stage model "$PY" benchmarks/model.py --capacities 0.5 0.25 --out "$OUT/model.json"
stage decode "$PY" benchmarks/decode.py --hidden 4096 --intermediate 11008 --heads 32 --kv-heads 8 \
    --vocab 32000 --dtype bfloat16 --batch-sizes 1,8,32,64 --out "$OUT/decode.json"
exit $status
