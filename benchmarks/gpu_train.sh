#!/usr/bin/env bash
# The trainer on a CUDA machine, bf16 autocast, L=512, needing neither `datasets`, `gguf`, `vllm` nor a
# network: topk shards of this Python's standard library are built once from a random 2-layer teacher with the
# default teacher's vocabulary (a step costs the same whatever the targets' values), then per student preset
# benchmarks/train_profile.py prints tokens/s, MFU (6·N per token), the phase table (data wait, copy, forward, loss,
# backward, optimizer) and torch.profiler's top operators.
#
#   bash benchmarks/gpu_train.sh                    # STUDENTS="base medium", BATCH=16
#   STUDENTS=base BATCH="16 64" bash benchmarks/gpu_train.sh
#   STUDENTS=base COMPILE=--compile PART_SECONDS=150 LOG_DIR=results bash benchmarks/gpu_train.sh
#   STUDENTS=base BATCH=auto BATCH_TOKENS=131072 bash benchmarks/gpu_train.sh   # the micro-batch that fits
#
# Each run is a part (benchmarks/parts.sh): under `timeout PART_SECONDS`, its output also in
# $LOG_DIR/train-<student>-<batch><compile>.log, a failed one not stopping the rest; the profiler's tables go to
# $LOG_DIR too.
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/parts.sh
SHARDS=${SHARDS:-$(mktemp -d)/shards}
for student in ${STUDENTS:-base medium}; do
  for batch in ${BATCH:-16}; do
    for compile in ${COMPILE:---compile --no-compile}; do
      part "train-$student-$batch$compile" "student $student, batch $batch, $compile" \
        "$PY" -m benchmarks.train_profile "$SHARDS" --rows "${ROWS:-512}" --seq-len "${SEQ_LEN:-512}" --student "$student" \
        --batch-size "$batch" ${BATCH_TOKENS:+--batch-tokens "$BATCH_TOKENS"} --steps "${STEPS:-20}" "$compile" \
        ${LOG_DIR:+--out "$LOG_DIR/profile-$student-$batch$compile"}
    done
  done
done
