"""On-policy rounds, end to end: the student samples, the teacher scores the states it visited, the student trains
on them mixed with the corpus targets. Each stage is its own command in its own process (the trainer never loads
the teacher), meeting through files under --out; a rerun skips what is finished and resumes what is not.

    python scripts/rounds.py --out rounds                # the embedded default: SmolLM2-135M on the tragedies
    python scripts/rounds.py --out rounds --rounds 2 --init-from default --steps 100 --lr 1e-4 --warmup 0.1

Options it does not know go to every `kdtrain run` (here --warmup).

The run is one schedule of --steps optimizer steps in R + 1 equal legs (`kdtrain run --stop-at`, then
`--resume`): leg 0 on the corpus targets alone (OUT/corpus: --corpus-rows rows), then before leg r the student
of leg r - 1 draws --state-rows trajectories (`kdtrain sample --states`: one state each, at a step drawn
uniformly), the teacher builds targets on them (`kdtargets build --states`, OUT/round-r), and leg r trains on
the corpus mixed with rounds 1..r (--share of each batch's rows, split evenly among the rounds). Teacher rows in
all: corpus rows + R x state rows; compare with an offline run given as many corpus rows and the same steps.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

TRAIN = [sys.executable, "-m", "ar2mdm.train.cli"]
TARGETS = [sys.executable, "-m", "ar2mdm.precompute.cli"]


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def checkpoint_step(run_dir: Path) -> int:
    """The step of the run's checkpoint, -1 without one."""
    cfg = run_dir / "checkpoint" / "config.json"
    return json.loads(cfg.read_text()).get("step", -1) if cfg.exists() else -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--corpus", help="training corpus (default: the embedded tragedies)")
    ap.add_argument("--corpus-shards", help="an existing build of corpus targets to train on (instead of OUT/corpus)")
    ap.add_argument("--teacher", help="teacher (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--mode", default="mc", choices=["mc", "topk", "fim"])
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--corpus-rows", type=int, default=80)
    ap.add_argument("--state-rows", type=int, default=80, help="trajectories (one state each) per round")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--share", type=float, default=0.5, help="share of each batch's rows from the rounds")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--sample-steps", type=int, default=16, help="denoising steps of the trajectories")
    ap.add_argument("--student", default="tiny")
    ap.add_argument("--init-from", help="adapt an AR model instead (e.g. default)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--lambda", dest="lam", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    a, more = ap.parse_known_args()  # the rest: `kdtrain run` options
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    teacher = ["--teacher", a.teacher] if a.teacher else []
    targets = ["--mode", a.mode, "--k", str(a.k), "--seq-len", str(a.seq_len), "--no-progress", *teacher]
    corpus = Path(a.corpus_shards) if a.corpus_shards else out / "corpus"
    if not a.corpus_shards:
        run([*TARGETS, "build", *([a.corpus] if a.corpus else []), "--out", str(corpus), *targets,
             "--max-sequences", str(a.corpus_rows), "--seqs-per-shard", "32"])  # fmt: skip
    student = ["--init-from", a.init_from] if a.init_from else ["--student", a.student]
    train = [*TRAIN, "run", str(corpus), "--out", str(out / "run"), *student, "--steps", str(a.steps)]
    train += ["--batch-size", str(a.batch_size), "--lr", str(a.lr), "--lambda", str(a.lam), "--seed", str(a.seed)]
    train += ["--no-progress", "--log-every", "10", *more]
    mix: list[str] = []
    for r in range(a.rounds + 1):
        end = a.steps * (r + 1) // (a.rounds + 1)
        if r > 0:  # the states of the student as it stands, then their targets
            states = out / f"states-{r}.jsonl"
            if not states.exists():
                draw = ["--num", str(a.state_rows), "--length", str(a.seq_len - 1), "--steps", str(a.sample_steps)]
                run(
                    [
                        *TRAIN,
                        "sample",
                        str(out / "run"),
                        *draw,
                        "--seed",
                        str(a.seed * 1000 + r),
                        "--states",
                        str(states),
                    ]
                )
            run([*TARGETS, "build", "--states", str(states), "--out", str(out / f"round-{r}"), *targets])
            mix = [f"{out / f'round-{j}'}:{a.share / r:.6g}" for j in range(1, r + 1)]
        if checkpoint_step(out / "run") < end:
            resume = ["--resume"] if checkpoint_step(out / "run") >= 0 else []
            run([*train, "--stop-at", str(end), *resume, *[x for m in mix for x in ("--mix", m)]])
    print(f"{out / 'run'}: {a.steps} steps; teacher rows: {corpus} + {a.rounds} x {a.state_rows} states")


if __name__ == "__main__":
    main()
