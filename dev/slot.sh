#!/usr/bin/env bash
# One call of at most 10 minutes on a lent GPU machine (torch, transformers, pyarrow, typer; no `datasets`, `gguf`
# or `vllm`, no network; a copy of the checkout without .git) that brings back the headline figures of the
# precompute and the trainer, each part under its own time limit (benchmarks/parts.sh), in order of worth:
#
#   1. the 135M shape's whole mc build, 1,024 rows, --batch-size auto (teacher tokens/s, MFU, fraction of the
#      bandwidth limit)                                                                                160 s
#   2. the 135M shape's whole topk build, 128 rows, the dense tree mask                                 90 s
#   3. the trainer, `base`, batch 16, compiled: tokens/s, MFU, the phase table, the profiler's top ops  140 s
#   4. the mc sampler alone, 32 rows batched against one at a time                                      70 s
#   5. topk as 2, with --tree-mask flex                                                                 60 s
#   6. the CUDA half of the tests that have one (`pytest -m gpu`)                                       90 s
#   7. if time is left: `base` again with --batch-size auto --batch-tokens 131072                     120 s
#
# A part gets its own limit or what is left before the call's deadline (BUDGET, 570 s), whichever is less.
# The call: command "bash dev/slot.sh", timeout_s 600; everything it prints is also in $OUT/slot.log.
set -uo pipefail
cd "$(dirname "$0")/.."
source dev/on_path.sh
log=${OUT:-.}/slot.log
deadline=$((SECONDS + ${BUDGET:-570}))  # the call's 600 s, less start-up and the copy back
within() {  # LIMIT COMMAND...: COMMAND with PART_SECONDS = LIMIT, or what is left before the deadline if less
  local limit=$1 left=$((deadline - SECONDS))
  shift
  if ((left < 15)); then echo "== (no time left for: $*)"; return 0; fi
  PART_SECONDS=$((limit < left ? limit : left)) "$@"
}
gpu_tests() {  # the CUDA half of the tests that have one (pytest -m gpu): CUDA graphs, flex, host syncs, auto batch
  echo "== the gpu-marked tests"
  timeout "$PART_SECONDS" "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/precompute/test_particles.py \
    tests/precompute/test_rescoring.py tests/train/test_memory.py tests/train/test_trainer.py
  echo "== (tests: exit status $?)"
}
export PYTHON=$PY
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv 2>/dev/null
  within 160 env SHAPES=135m PARTS=mc-build MC_ROWS=1024 bash benchmarks/gpu.sh
  within 90 env SHAPES=135m PARTS=topk-dense TOPK_ROWS=128 bash benchmarks/gpu.sh
  within 140 env STUDENTS=base COMPILE=--compile ROWS=256 bash benchmarks/gpu_train.sh
  within 70 env SHAPES=135m PARTS=mc-sampler MC_SAMPLER_ROWS=32 bash benchmarks/gpu.sh
  within 60 env SHAPES=135m PARTS=topk-flex TOPK_ROWS=128 bash benchmarks/gpu.sh
  within 90 gpu_tests
  within 120 env STUDENTS=base COMPILE=--compile ROWS=256 BATCH=auto BATCH_TOKENS=131072 bash benchmarks/gpu_train.sh
  date -u
} 2>&1 | tee "$log"
