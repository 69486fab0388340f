#!/usr/bin/env bash
# The main job on the embedded default, sized for a 2-core CPU (about 5 minutes):
# build top-K rescoring targets with SmolLM2-135M on Shakespeare, validate and inspect them,
# train a small student on them, evaluate it on held-out text (the comedies: never trained on) and sample.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-shards}
RUN=${RUN:-runs/quickstart}
kdtargets build --out "$OUT" --seq-len 64 --k 4 --window 8 --max-sequences 24 --seqs-per-shard 8
kdtargets validate "$OUT"
kdtargets inspect "$OUT"
kdtrain run "$OUT" --out "$RUN" --student tiny --epochs 20 --batch-size 8 --lr 2e-3 --save-every 50 --log-every 2
HELDOUT=$(python -c "from ar2mdm.shared.defaults import default_corpus; print(default_corpus('comedies'))")
kdtrain eval "$RUN" --data "$HELDOUT" --max-rows 64
kdtrain sample "$RUN" --prompt "To be, or not to be" --length 16 --steps 8
kdtrain plot "$RUN"
