#!/usr/bin/env bash
# The precompute on a CUDA machine, bf16, L=512, K=8, W=16, needing neither `datasets`, `gguf`, `vllm` nor a
# network: the teachers are random-initialised with the default teacher's config and tokenizer (throughput does
# not depend on the weights' values), and the corpus is this Python's standard library.
# Per shape: the mc sampler alone, its rows batched against one at a time (benchmarks/mc.py: tokens/s, MFU, the
# fraction of the memory-bandwidth limit), then whole builds as the CLI runs them (benchmarks/build_speed.py):
# mc smc with --batch-size auto, and topk with the tree mask dense and as FlexAttention (--tree-mask flex).
#
#   bash benchmarks/gpu.sh                       # SHAPES="135m 1.7b"
#   SHAPES=135m MC_ROWS=1024 bash benchmarks/gpu.sh
#   TEACHER=/path/to/folder bash benchmarks/gpu.sh   # a real teacher instead of the random shapes
#   PARTS="mc-build topk-dense" PART_SECONDS=150 LOG_DIR=results bash benchmarks/gpu.sh
#
# PARTS: which of mc-sampler mc-build topk-dense topk-flex run (default all), in the order given; each under
# `timeout PART_SECONDS` (default: none), its output also in $LOG_DIR/<shape>-<part>.log with LOG_DIR set, a
# failed part not stopping the others (benchmarks/parts.sh). MC_SAMPLER_ROWS: the sampler-alone rows (64).
set -uo pipefail
cd "$(dirname "$0")/.."
source benchmarks/parts.sh
CORPUS=${CORPUS:-$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")}
SHAPES=${SHAPES:-135m 1.7b}
PARTS=${PARTS:-mc-sampler mc-build topk-dense topk-flex}
L=${SEQ_LEN:-512}

for shape in $SHAPES; do
  case $shape in 135m) mc_rows=${MC_ROWS:-1024}; tk_rows=${TOPK_ROWS:-256} ;; *) mc_rows=${MC_ROWS:-128}; tk_rows=${TOPK_ROWS:-64} ;; esac
  if [[ -n "${TEACHER:-}" ]]; then which=(--teacher "$TEACHER"); tag=teacher; else which=(--shape "$shape"); tag=$shape; fi
  for p in $PARTS; do
    case $p in
      mc-sampler)
        [[ -n "${TEACHER:-}" ]] && continue
        part "$tag-$p" "$shape: the mc sampler alone (${MC_SAMPLER_ROWS:-64} rows)" \
          "$PY" -m benchmarks.mc --shape "$shape" --rows "${MC_SAMPLER_ROWS:-64}" --seq-len "$L" --k 8 ;;
      mc-build)
        part "$tag-$p" "$shape: kdtargets build --mode mc (smc), $mc_rows rows, --batch-size auto" \
          "$PY" -m benchmarks.build_speed "${which[@]}" --corpus "$CORPUS" --mode mc --rows "$mc_rows" --seq-len "$L" --k 8 ;;
      topk-dense | topk-flex)
        part "$tag-$p" "$shape: kdtargets build --mode topk, $tk_rows rows, --token-budget auto, --tree-mask ${p#topk-}" \
          "$PY" -m benchmarks.build_speed "${which[@]}" --corpus "$CORPUS" --mode topk --rows "$tk_rows" --seq-len "$L" \
          --k 8 --window 16 -- --tree-mask "${p#topk-}" ;;
      *) echo "benchmarks/gpu.sh: PARTS: no part $p (mc-sampler mc-build topk-dense topk-flex)" >&2; exit 2 ;;
    esac
  done
  [[ -n "${TEACHER:-}" ]] && break
done
