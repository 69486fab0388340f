#!/usr/bin/env bash
# KD at the scale users train at, in phases run one at a time or all at once. Everything lands in $D (default
# study/); a phase skips what an earlier run of it finished, so a stopped phase resumes.
#
# Corpus: this Python's standard library (code: on every machine, nothing to carry), split by file: every 20th
# file in sorted order is held out and never trained on ($D/heldout), the rest is $D/train.
#
#   PHASE=build    mc targets (K = 8, the default estimator) for ROWS rows of SEQ_LEN, and topk targets for
#                  TOPK_ROWS rows; the build seconds go to $D/seconds.txt
#   PHASE=scratch  `kdtrain sweep` on the mc shards: λ ∈ {0, 0.5} x seed ∈ {1, 2}, STUDENT from scratch, one epoch;
#                  then λ = 0.5 on the topk shards (2 seeds); then the compute-matched λ = 0: as many steps as fit
#                  in the build's seconds plus the KD run's, on the same rows (2 seeds)
#   PHASE=a2d      the A2D warm start (--init-from the teacher) at the same scale: λ ∈ {0, 0.5} x 2 seeds
#   PHASE=curve    the held-out bound against tokens seen for λ = 0 and 0.5 (seed 1): one epoch in CURVE_POINTS
#                  legs (--stop-at, then --resume: the same run as uninterrupted), evaluated after each;
#                  $D/curve.jsonl and $D/curve.png
#   PHASE=tables   every phase's sweep.md, with the compute-matched arithmetic, into $D/results.md
#
#   PHASE=build bash scripts/study_scale.sh            # ROWS=4096 (2.1M tokens at L = 512), TOPK_ROWS=512
#   PHASE=scratch STUDENT=base bash scripts/study_scale.sh
#   ROWS=16 TOPK_ROWS=8 SEQ_LEN=64 STUDENT=tiny PHASE=all bash scripts/study_scale.sh   # the plumbing, on a CPU
#
# TEACHER: a teacher folder or GGUF (default: the default teacher). Not yet run on a GPU: its sizes are estimates
# (docs/scaling.md, "KD at scale").
set -euo pipefail
cd "$(dirname "$0")/.."
D=${D:-study}
ROWS=${ROWS:-4096}
TOPK_ROWS=${TOPK_ROWS:-512}
L=${SEQ_LEN:-512}
STUDENT=${STUDENT:-base}
BATCH=${BATCH:-16}
EVAL_ROWS=${EVAL_ROWS:-256}
PHASE=${PHASE:-all}
PY=${PY:-${PYTHON:-$(command -v python3 || command -v python)}}
teacher=(${TEACHER:+--teacher "$TEACHER"})
mkdir -p "$D"
say() { echo "== study_scale: $*" >&2; }
# as modules: the same whether the project is installed or only on PYTHONPATH
kdtargets() { "$PY" -m ar2mdm.precompute.cli "$@"; }
kdtrain() { "$PY" -m ar2mdm.train.cli "$@"; }

if [[ ! -d "$D/train" ]]; then  # the split, by file, decided by the sorted path list alone
  "$PY" - "$D" <<'PY'
import os, sys, sysconfig
from pathlib import Path
d, lib = Path(sys.argv[1]), Path(sysconfig.get_paths()["stdlib"])
files = sorted(p for p in lib.rglob("*.py") if "site-packages" not in p.parts and "test" not in p.parts)
for i, f in enumerate(files):
    link = d / ("heldout" if i % 20 == 0 else "train.tmp") / f.relative_to(lib)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(f)
os.replace(d / "train.tmp", d / "train")
print(f"{len(files)} files: {len(files) - len(files[::20])} to train on, {len(files[::20])} held out", file=sys.stderr)
PY
fi

if [[ $PHASE == build || $PHASE == all ]]; then
  for mode in mc topk; do
    rows=$([[ $mode == mc ]] && echo "$ROWS" || echo "$TOPK_ROWS")
    if [[ -f "$D/$mode/manifest.json" ]] && kdtargets validate "$D/$mode" >/dev/null 2>&1; then continue; fi
    say "build $mode, $rows rows of $L"
    t0=$(date +%s.%N)
    kdtargets build "$D/train" "${teacher[@]}" --out "$D/$mode" --mode "$mode" --k 8 --seq-len "$L" \
      --max-sequences "$rows" --no-progress
    echo "$mode $("$PY" -c "print(round($(date +%s.%N) - $t0, 1))")" >> "$D/seconds.txt"
  done
fi

sweep() {  # NAME SHARDS --grid/--set ...: one sweep, evaluated on the held-out files with the same rows and masks
  local name=$1 shards=$2
  shift 2
  kdtrain sweep "$shards" --out "$D/$name" --eval-data "$D/heldout" --eval-rows "$EVAL_ROWS" \
    --set student="$STUDENT" --set batch_size="$BATCH" --grid seed=1,2 "$@" > /dev/null
}

if [[ $PHASE == scratch || $PHASE == all ]]; then
  say "from scratch: λ 0 and 0.5 on mc targets; λ 0.5 on topk targets"
  sweep scratch-mc "$D/mc" --grid lambda=0,0.5 --set epochs=1
  sweep scratch-topk "$D/topk" --grid lambda=0.5 --set epochs=1
  # compute-matched: λ = 0 gets the mc build's seconds plus the KD run's, as more steps on the same rows
  steps=$("$PY" - "$D" <<'PY'
import json, sys
from pathlib import Path
d = Path(sys.argv[1])
build = dict(line.split() for line in (d / "seconds.txt").read_text().splitlines())
runs = {json.loads((p / "eval.json").read_text())["name"]: json.loads((p / "eval.json").read_text())
        for p in (d / "scratch-mc").iterdir() if (p / "eval.json").exists()}
mdm = [r for r in runs.values() if float(r["lambda"]) == 0]
kd = [r for r in runs.values() if float(r["lambda"]) == 0.5]
step_s = sum(r["wall_s"] / r["steps"] for r in mdm) / len(mdm)
budget = float(build["mc"]) + sum(r["wall_s"] for r in kd) / len(kd)
print(max(int(budget / step_s), mdm[0]["steps"]))
PY
)
  say "compute-matched λ = 0: $steps steps"
  echo "$steps" > "$D/matched_steps.txt"
  sweep scratch-matched "$D/mc" --grid lambda=0 --set steps="$steps"
fi

if [[ $PHASE == a2d || $PHASE == all ]]; then
  say "A2D warm start: λ 0 and 0.5"
  sweep a2d "$D/mc" --grid lambda=0,0.5 --set epochs=1 --set init_from="${TEACHER:-default}"
fi

if [[ $PHASE == curve || $PHASE == all ]]; then
  points=${CURVE_POINTS:-4}
  total=$(( $("$PY" -c "from ar2mdm.train.data import load_shard_manifest as m
print(sum(s.rows for s in m('$D/mc').shards))") / BATCH ))
  stops=$("$PY" -c "print(*sorted({max(1, $total * q // $points) for q in range(1, $points + 1)}))")
  for lam in 0 0.5; do
    run=$D/curve/lam$lam
    for stop in $stops; do
      if grep -qs "\"lambda\": $lam, \"step\": $stop," "$D/curve.jsonl"; then continue; fi
      say "curve: λ $lam, to step $stop of $total"
      resume=$([[ -d "$run/checkpoint" ]] && echo --resume || echo --no-resume)
      kdtrain run "$D/mc" --out "$run" --student "$STUDENT" --batch-size "$BATCH" --lambda "$lam" --seed 1 \
        --steps "$total" --stop-at "$stop" "$resume" --no-progress > /dev/null
      kdtrain eval "$run" --data "$D/heldout" --max-rows "$EVAL_ROWS" | tail -1 | "$PY" -c "
import json, sys; r = json.load(sys.stdin)
print(json.dumps({'lambda': $lam, 'step': $stop, 'tokens': $stop * $BATCH * $L, 'nll_bound': r['nll_bound'], 'se': r['nll_bound_se']}))" \
        >> "$D/curve.jsonl"
    done
  done
  "$PY" - "$D" <<'PY'
import json, sys
from pathlib import Path
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
d = Path(sys.argv[1])
pts = [json.loads(line) for line in (d / "curve.jsonl").read_text().splitlines()]
for lam in sorted({p["lambda"] for p in pts}):
    c = sorted((p for p in pts if p["lambda"] == lam), key=lambda p: p["tokens"])
    plt.errorbar([p["tokens"] for p in c], [p["nll_bound"] for p in c], [p["se"] for p in c], marker="o", capsize=3,
                 label=f"λ = {lam}")
plt.xlabel("tokens seen"); plt.ylabel("held-out nll_bound (nats/token)"); plt.legend(); plt.grid(alpha=0.3)
plt.savefig(d / "curve.png", dpi=120, bbox_inches="tight")
PY
fi

if [[ $PHASE == tables || $PHASE == all ]]; then
  {
    echo "# KD at scale: $("$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU")'), $(date -u +%F)"
    echo
    echo "rows: mc $ROWS, topk $TOPK_ROWS, L = $L; student $STUDENT; build seconds: $(tr '\n' ' ' < "$D/seconds.txt");"
    echo "compute-matched λ = 0: $(cat "$D/matched_steps.txt" 2>/dev/null || echo '-') steps (the mc build's seconds + the KD run's)"
    for s in scratch-mc scratch-topk scratch-matched a2d; do
      [[ -f "$D/$s/sweep.md" ]] && { echo; echo "## $s"; echo; cat "$D/$s/sweep.md"; }
    done
    if [[ -f "$D/curve.jsonl" ]]; then
      echo; echo "## held-out bound against tokens seen (seed 1; curve.png)"; echo
      echo "| λ | step | tokens | nll_bound |"; echo "| --- | --- | --- | --- |"
      "$PY" -c "import json
for l in open('$D/curve.jsonl'): r = json.loads(l); print(f\"| {r['lambda']} | {r['step']} | {r['tokens']} | {r['nll_bound']:.3f} ± {r['se']:.3f} |\")"
    fi
  } > "$D/results.md"
  cat "$D/results.md"
fi
