"""Does distillation help? Train the same student with λ=0 and λ=0.5 for the same steps on the same shards
and print the held-out ELBO bound of both (lower is better).

    python -m benchmarks.kd_gain SHARDS HELDOUT [--steps 300] [--student tiny]

SHARDS: a `kdtargets build` output (e.g. the default teacher on the default corpus); HELDOUT: text the shards
did not come from (a corpus folder or another shard folder).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from ar2mdm.train.config import EvalConfig, TrainConfig
from ar2mdm.train.evaluate import evaluate
from ar2mdm.train.loop import run_training


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("heldout")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--student", default="tiny")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--max-rows", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--tail", default="renormalize")
    ap.add_argument("--lam", type=float, default=0.5, help="the KD run's λ (the baseline is λ=0)")
    a = ap.parse_args()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lam in (0.0, a.lam):
            run = Path(tmp) / f"lam{lam}"
            run_training(
                TrainConfig(
                    shards=a.shards,
                    out=str(run),
                    student=a.student,
                    lam=lam,
                    steps=a.steps,
                    batch_size=a.batch_size,
                    lr=a.lr,
                    save_every=a.steps,
                    progress=False,
                    temperature=a.temperature,
                    tail=a.tail,
                )
            )
            results[lam] = evaluate(EvalConfig(run=str(run), data=a.heldout, seed=0, mask_draws=4, max_rows=a.max_rows))
            print(f"λ={lam}: " + json.dumps(results[lam]))
    d = results[a.lam]["nll_bound"] - results[0.0]["nll_bound"]
    print(
        f"held-out nll_bound: λ=0 {results[0.0]['nll_bound']:.4f}, λ={a.lam} {results[a.lam]['nll_bound']:.4f} "
        f"(difference {d:+.4f} nats/token; negative means KD helped)"
    )


if __name__ == "__main__":
    main()
