#!/usr/bin/env bash
# The main job on the embedded default, sized for a 2-core CPU (about 7 minutes once installed):
# build top-K targets for a block student (blocks of 4 tokens; left-only, the teacher's next-token distributions,
# the default) with SmolLM2-135M on Shakespeare's tragedies, validate and inspect them; train a tiny block student
# from scratch on them, and adapt the teacher itself into a block student (A2D warm start, 12 steps); evaluate both
# on held-out text (the comedies, never trained on) and show what they predict; judge the adapted student's samples
# beside the teacher's own, with the tokens each drew per forward (kdtrain sample, kdtargets sample / score).
# Safe to rerun: finished shards are kept, the two demo runs are retrained. The adapted student is exported
# (kdtrain export) and sampled through transformers alone.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
OUT=${OUT:-shards}
RUN=${RUN:-runs/quickstart}
HELDOUT=$(python -c "from ar2mdm.shared.defaults import default_corpus; print(default_corpus('comedies'))")
LINE="To be, or not to [MASK], that is the [MASK]: whether 'tis nobler in the [MASK] to suffer"
BLOCK=${BLOCK:-4}
kdtargets build --out "$OUT" --seq-len 64 --block-size "$BLOCK" --max-sequences 24 --seqs-per-shard 8
kdtargets validate "$OUT"
kdtargets inspect "$OUT"
rm -rf "$RUN" "$RUN-a2d"
# 1. a tiny block student from scratch: 24 rows are enough to see the losses fall, not to learn English
kdtrain run "$OUT" --out "$RUN" --student tiny --epochs 20 --batch-size 8 --lr 2e-3 --save-every 50 --log-every 2
kdtrain eval "$RUN" --data "$HELDOUT" --max-rows 64
kdtrain fill "$RUN" --text "$LINE"
kdtrain plot "$RUN"
# 2. the teacher adapted into a block student (causal across blocks, bidirectional inside one; AR shift kept), KD
# on the same shards
kdtrain run "$OUT" --out "$RUN-a2d" --init-from default --steps 12 --batch-size 8 --lr 1e-4 --warmup 0.1 --log-every 4
kdtrain eval "$RUN-a2d" --data "$HELDOUT" --max-rows 64
kdtrain fill "$RUN-a2d" --text "$LINE"
echo "a sample of the adapted block student (block by block, the KV cache of the blocks before):"
kdtrain sample "$RUN-a2d" --prompt "To be, or not to be" --length 16
# 3. sample quality as the field measures it: 16 held-out prompts (each comedy row's first 15 tokens), the adapted
# student's samples (32 tokens) and the teacher's own, judged by the teacher: bits per byte of the completions
# (lower is better), the entropy of their tokens (repetition lowers it) and the tokens drawn per model forward
P=(--prompts-from "$HELDOUT" --prompt-tokens 15 --num 16)
kdtrain sample "$RUN-a2d" "${P[@]}" --out "$RUN-a2d/samples.jsonl"
kdtargets sample "${P[@]}" --out "$RUN-a2d/teacher-samples.jsonl"
kdtargets score "$RUN-a2d/samples.jsonl" "$RUN-a2d/teacher-samples.jsonl" --out "$RUN-a2d/scores.json" > /dev/null
python - "$RUN-a2d/scores.json" <<'PY'
import json, sys
f = json.load(open(sys.argv[1]))["files"]
s, t = ((x["judges"]["default"]["bits_per_byte"], x["text"]["entropy"], x["text"]["tokens_per_forward"]) for x in f)
print(f"judged by the teacher: the adapted block student's samples {s[0]:.2f} bits/byte (entropy {s[1]:.2f} nats, "
      f"{s[2]:.2f} tokens per forward), the teacher's own {t[0]:.2f} ({t[1]:.2f} nats, {t[2]:.2f} tokens per forward)")
PY
# 4. the adapted student as a transformers folder, loaded and sampled by transformers alone
kdtrain export "$RUN-a2d" --out "$RUN-a2d-hf" --overwrite
python - "$RUN-a2d-hf" <<'PY'
import sys, torch
from transformers import AutoModelForMaskedLM, AutoTokenizer
model = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True)
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = torch.tensor([[tok.bos_token_id or tok.eos_token_id] + tok("To be, or not to be", add_special_tokens=False).input_ids])
out = model.diffusion_generate(ids, max_new_tokens=16)
print("transformers:", repr(tok.decode(out[0, ids.shape[1]:])))
PY
echo
echo "results: $OUT/ (targets + manifest.json), $RUN/ and $RUN-a2d/ (checkpoint/, metrics.jsonl; $RUN/loss.png;"
echo "         $RUN-a2d/samples.jsonl, teacher-samples.jsonl and scores.json: the samples and every judged figure),"
echo "         $RUN-a2d-hf/ (a transformers folder: AutoModelForMaskedLM.from_pretrained(..., trust_remote_code=True))"
