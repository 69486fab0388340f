#!/usr/bin/env bash
# The SFT recipe of docs/sft.md, end to end on the 2-core CPU (about 40 minutes with the defaults below):
# chatterbot dialogues split into training and held-out dialogues; mc targets from the default teacher (its
# chat template); the teacher adapted into a diffusion student (A2D warm start) at λ = 0 and λ = 0.5, two
# seeds, equal steps; the held-out response bound of each, and three answers from each next to the teacher's.
# Everything lands in $D (default sft/); a rerun keeps the finished shards and retrains the students.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python -c "import chatterbot_corpus" 2>/dev/null || python -m pip install -q --no-deps chatterbot-corpus==1.3.3
D=${D:-sft}
ROWS=${ROWS:-384}     # training chats built (of 2,150)
STEPS=${STEPS:-96}    # optimizer steps per student (batch 8: two epochs of 384 rows)
SEQ=${SEQ:-64}
SEEDS=${SEEDS:-"0 1"}
ASK=("What is a super computer?" "What annoys you?" "When do you die")  # held-out prompts
mkdir -p "$D/runs" "$D/eval"
python scripts/chatterbot_to_jsonl.py "$D/train.jsonl" --heldout "$D/heldout.jsonl"
kdtargets build "$D/train.jsonl" --task sft --mode mc --k 4 --seq-len "$SEQ" --max-sequences "$ROWS" \
    --seqs-per-shard 64 --out "$D/shards"
kdtargets validate "$D/shards"
python scripts/teacher_chat.py "$D/heldout.jsonl" --seq-len "$SEQ" "${ASK[@]/#/--ask=}" | tee "$D/eval/teacher.txt"
# the warm start before any training: what the adaptation starts from
kdtrain run "$D/shards" --out "$D/runs/start" --init-from default --steps 0 --no-progress > /dev/null
for seed in $SEEDS; do
  for lam in 0 0.5; do
    run="$D/runs/lam$lam-seed$seed"
    rm -rf "$run"
    kdtrain run "$D/shards" --out "$run" --init-from default --lambda "$lam" --steps "$STEPS" --batch-size 8 \
        --lr 1e-4 --warmup 0.1 --seed "$seed" --save-every 100000 --log-every 8 --no-progress > /dev/null
    for q in "${ASK[@]}"; do
      for span in "" "--span-length 8"; do
        # shellcheck disable=SC2086
        echo "$run ${span:-whole}: $(kdtrain sample "$run" --prompt "$q" --length 32 --steps 32 --temperature 0 --remasking low-confidence $span | tail -1)"
      done
    done | tee -a "$D/eval/samples.txt"
  done
done
# every student on the same held-out rows and masks (kdtrain eval's estimator, per row: paired differences)
python scripts/sft_table.py "$D"
