#!/usr/bin/env bash
# Everything GPU-side in one call, for an environment that already has a CUDA torch and dlo installed:
# the gpu-marked tests (compiled Triton kernels vs torch twins, fp32/bf16/fp16, and a routed model's forward and
# backward with DLO_KERNELS=triton against the torch path), the benchmarks at GPU sizes (compiled training steps
# included), then the SFT recipe sharded with FSDP2 and DeepSpeed ZeRO-3 against one unsharded process
# (docs/DISTRIBUTED.md).
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
stage long-seq "$PY" benchmarks/long_seq.py --seqs 2048 4096 8192 --out "$OUT/long_seq.json"
stage similarity "$PY" benchmarks/similarity.py --out "$OUT/similarity.json"
stage compiled "$PY" benchmarks/compiled.py --out "$OUT/compiled.json"  # inductor (Triton) vs eager training steps
stage decode "$PY" benchmarks/decode.py --sizes 1024,4096 --dtype bfloat16 --batch-sizes 1,8,32,64 \
    --out "$OUT/decode.json"
# Static caches, decode steps compiled with mode="reduce-overhead" (CUDA graphs) for every variant: the routed
# decode step has no host sync and no per-step Python state there (docs/GENERATION.md).
stage decode-static "$PY" benchmarks/decode.py --sizes 1024,4096 --dtype bfloat16 --batch-sizes 1,8,32,64 \
    --cache static --compile --out "$OUT/decode_static.json"

# The SFT recipe on the tiny default through the shipped accelerate configs (FSDP2: fsdp.yaml, ZeRO-3: zero3.yaml)
# and one unsharded process, all at a global batch of 16. Two processes where there are two GPUs; NCCL refuses
# two ranks on one GPU, so a single GPU runs each config as one process: the sharded wrappers, the sharded
# checkpoints, the routing state's commits and the gathered final save are exercised all the same.
NPROC=$(( $(nvidia-smi -L | grep -c '^GPU') >= 2 ? 2 : 1 ))
SFT=(recipes/sft.py --config recipes/configs/tiny.yaml training.use_cpu=false training.max_steps=40
     training.save_steps=20 "training.per_device_train_batch_size=$((16 / NPROC))")
launch() { "$PY" -m accelerate.commands.launch "$@"; }
rm -rf "$OUT"/sft-plain "$OUT"/sft-fsdp "$OUT"/sft-zero3  # the recipe refuses to mix runs in one output_dir
stage sft-plain launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    "${SFT[@]}" output_dir="$OUT/sft-plain"
stage sft-fsdp launch --config_file recipes/accelerate/fsdp.yaml --num_processes "$NPROC" \
    "${SFT[@]}" output_dir="$OUT/sft-fsdp"
sharded=(sft-fsdp)
if "$PY" -c "import deepspeed" 2>/dev/null; then
    stage sft-zero3 launch --config_file recipes/accelerate/zero3.yaml --num_processes "$NPROC" \
        "${SFT[@]}" output_dir="$OUT/sft-zero3"
    sharded+=(sft-zero3)
else
    echo "== sft-zero3: skipped, deepspeed is not installed (pip install deepspeed)" | tee "$OUT/sft-zero3.log"
fi

check_sharded() {  # each sharded final/ loads in one fresh process, committed every step, trained like the plain run
    "$PY" - "$OUT" "$@" <<'EOF'
import json
import sys

import dlo

out, runs = sys.argv[1], sys.argv[2:]
plain = json.load(open(f"{out}/sft-plain/final/summary.json"))
failed = False
for run in runs:
    final = f"{out}/{run}/final"
    summary = json.load(open(f"{final}/summary.json"))
    base = json.load(open(f"{final}/config.json"))["dlo_routing"]["base_architecture"]
    committed = int(dlo.routing_state(dlo.load_model(final)).step)
    gap = abs(summary["eval_loss"] - plain["eval_loss"])
    targets = [[row["target_capacity"] for row in s["layers"]] for s in (summary, plain)]
    print(f"{run}: steps {summary['steps']}, routing steps committed {committed}, base {base}, eval loss "
          f"{summary['eval_loss']} vs plain {plain['eval_loss']} (gap {gap:.4f}), targets {targets[0]} vs {targets[1]}")
    # bf16 compute differs between FSDP2, ZeRO-3 and autocast: the losses agree loosely, the bookkeeping exactly.
    failed |= committed != summary["steps"] or base != "LlamaForCausalLM" or gap > 0.1
sys.exit(1 if failed else 0)
EOF
}
stage sft-check check_sharded "${sharded[@]}"
exit $status
