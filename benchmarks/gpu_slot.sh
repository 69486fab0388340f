#!/usr/bin/env bash
# One short GPU slot (a single call of at most 10 minutes on one H200) that brings back the headline figures of
# issues 19 and 20 on a machine set up as this project's GPU machines are: torch, transformers, pyarrow, typer;
# no `datasets`, `gguf` or `vllm`, no network, and a copy of the checkout without .git. In order of worth, each
# part under its own time limit so that a slow one costs only itself (benchmarks/parts.sh):
#
#   1. the 135M shape's whole mc build, 1,024 rows, --batch-size auto (issue 19's headline: teacher tokens/s, MFU,
#      fraction of the bandwidth limit)                                                              160 s
#   2. the 135M shape's whole topk build, 128 rows, the dense tree mask                                 90 s
#   3. the trainer, `base`, batch 16, compiled: tokens/s, MFU, the phase table, the profiler's top ops  140 s
#   4. the mc sampler alone against the one before issue 19, 32 rows                                    70 s
#   5. topk as 2, with --tree-mask flex                                                                 60 s
#   6. the CUDA half of the tests that have one (`pytest -m gpu`: the decode step as a CUDA graph against
#      the dynamic cache, flex against dense, host syncs, the trainer's --batch-size auto)             90 s
#   7. if time is left: `base` again with --batch-size auto --batch-tokens 131072 (256 rows a step, in the
#      largest micro-batches that fit): the MFU a bigger batch reaches                                 120 s
#
# A part gets its own limit or what is left before the call's deadline (BUDGET, 570 s), whichever is less.
#
# Here, before the call (the old sampler is read from git, which the copy there lacks):
#   bash benchmarks/gpu_slot.sh --prepare          # writes .bench/ (ignored, 40 KB)
# The call (the device tool's `run`): command "bash benchmarks/gpu_slot.sh", carry [".bench"], timeout_s 600.
# Everything it prints is also in $OUT/slot.log (the device tool brings $OUT back). Then fill docs/scaling.md.
set -uo pipefail
cd "$(dirname "$0")/.."
if [[ "${1:-}" == --prepare ]]; then
  rev=${BASELINE:-c23c40f}
  mkdir -p ".bench/$rev"
  for name in mc mc_rows; do git show "$rev:precompute/$name.py" > ".bench/$rev/$name.py"; done
  echo "wrote .bench/$rev: carry .bench in the call"
  exit 0
fi
source scripts/on_path.sh
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
