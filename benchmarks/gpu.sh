#!/usr/bin/env bash
# The precompute on a CUDA machine (issue 19), bf16, L=512, K=8, W=16, as it runs there: no `datasets`, `gguf` or
# `vllm` and no network, so the teachers are random-initialised with the default teacher's config and tokenizer
# (throughput does not depend on the weights' values), and the corpus is this Python's standard library.
# Per shape: the mc sampler alone against the sampler before issue 19 (benchmarks/mc.py: tokens/s, MFU, the
# fraction of the memory-bandwidth limit), then whole builds as the CLI runs them (benchmarks/build_speed.py):
# mc smc with --batch-size auto, and topk with the tree mask dense and as FlexAttention (--tree-mask flex).
#
#   bash benchmarks/gpu.sh                       # SHAPES="135m 1.7b"
#   SHAPES=135m MC_ROWS=1024 bash benchmarks/gpu.sh
#   TEACHER=/path/to/folder bash benchmarks/gpu.sh   # a real teacher instead of the random shapes
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'benchmarks/gpu.sh: no CUDA device')"
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, torch {torch.__version__}')"
date -u
CORPUS=${CORPUS:-$("$PY" -c "import sysconfig; print(sysconfig.get_paths()['stdlib'])")}
SHAPES=${SHAPES:-135m 1.7b}
L=${SEQ_LEN:-512}
for shape in $SHAPES; do
  case $shape in 135m) mc_rows=${MC_ROWS:-1024}; tk_rows=${TOPK_ROWS:-256} ;; *) mc_rows=${MC_ROWS:-128}; tk_rows=${TOPK_ROWS:-64} ;; esac
  if [[ -n "${TEACHER:-}" ]]; then which=(--teacher "$TEACHER"); else which=(--shape "$shape"); fi
  echo "== $shape: the mc sampler alone (64 rows)"
  if [[ -z "${TEACHER:-}" ]]; then "$PY" benchmarks/mc.py --shape "$shape" --rows 64 --seq-len "$L" --k 8 --baseline "${BASELINE:-c23c40f}"; fi
  echo "== $shape: kdtargets build --mode mc (smc), $mc_rows rows, --batch-size auto"
  "$PY" benchmarks/build_speed.py "${which[@]}" --corpus "$CORPUS" --mode mc --rows "$mc_rows" --seq-len "$L" --k 8
  for mask in dense flex; do
    echo "== $shape: kdtargets build --mode topk, $tk_rows rows, --token-budget auto, --tree-mask $mask"
    "$PY" benchmarks/build_speed.py "${which[@]}" --corpus "$CORPUS" --mode topk --rows "$tk_rows" --seq-len "$L" \
      --k 8 --window 16 -- --tree-mask "$mask"
  done
  [[ -n "${TEACHER:-}" ]] && break
done
