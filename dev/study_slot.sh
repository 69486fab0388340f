#!/usr/bin/env bash
# One GPU call of the KD-at-scale study (scripts/study_scale.sh) with the real default teacher. The shards do not
# travel (a call brings back 8 files at most), so a call builds what its phases need and brings back the tables.
#
#   here, once:      bash dev/carry_teacher.sh prepare
#   device call 1:   command "bash dev/carry_teacher.sh stage1", carry ["dev/.carry1"]
#   device call 2, at once:
#                    command "bash dev/study_slot.sh", carry ["dev/.carry2"], timeout_s 600
#                    e.g. command "ROWS=2048 PHASES='build scratch' bash dev/study_slot.sh"
#
# PHASES (default "build scratch"; then "build a2d curve" in another slot) run in order against one deadline
# (BUDGET seconds, default 540, of which the last 20 are kept for the tables); a phase cut by it stops there.
# After every phase the tables are remade and $OUT gets study.log, results.md, seconds.txt, matched_steps.txt,
# curve.jsonl and curve.png (those that exist). The study's own knobs (ROWS, TOPK_ROWS, STUDENT, ...) pass through.
set -uo pipefail
cd "$(dirname "$0")/.."
source dev/carry_teacher.sh stage2 || exit 1
export PYTHONUNBUFFERED=1 D=${D:-/tmp/study}
out=${OUT:-.}
deadline=$((SECONDS + ${BUDGET:-540} - 20))
for phase in ${PHASES:-build scratch}; do
  left=$((deadline - SECONDS))
  if ((left < 10)); then echo "== study_slot: no time left for $phase" | tee -a "$out/study.log"; break; fi
  echo "== study_slot: $phase ($left s left)" | tee -a "$out/study.log"
  PHASE=$phase timeout "$left" bash scripts/study_scale.sh 2>&1 | tee -a "$out/study.log"
  [[ ${PIPESTATUS[0]} == 124 ]] && echo "== study_slot: $phase stopped at the deadline" | tee -a "$out/study.log"
  PHASE=tables bash scripts/study_scale.sh > /dev/null 2>> "$out/study.log"
  for f in results.md seconds.txt matched_steps.txt curve.jsonl curve.png; do
    if [[ -f "$D/$f" ]]; then cp "$D/$f" "$out/"; fi
  done
done
