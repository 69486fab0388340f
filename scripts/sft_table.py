"""The table of docs/sft.md from a `scripts/sft_recipe.sh` folder: each student's held-out response bound
± s.e. and, per seed, λ = 0.5 against λ = 0 as a paired difference on the same rows and masks.

    python scripts/sft_table.py sft/
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main() -> None:
    from ar2mdm.train.config import EvalConfig
    from ar2mdm.train.evaluate import evaluate
    from ar2mdm.train.sweep import paired_delta

    d = Path(sys.argv[1])
    runs = sorted(p for p in (d / "runs").iterdir() if (p / "checkpoint").is_dir())
    res = {}
    for run in runs:  # the same held-out rows and masks (seed 0) for every student: differences are paired
        res[run.name] = evaluate(
            EvalConfig(run=str(run), data=str(d / "heldout.jsonl"), max_rows=256, row_estimates=True)
        )
    print("| student | held-out response bound (nats/token) | Δ vs λ = 0, same seed | masked-token accuracy |")
    print("| --- | --- | --- | --- |")
    for name, r in res.items():
        base = res.get(name.replace("lam0.5", "lam0")) if "lam0.5" in name else None
        delta = paired_delta(r, base) if base else ""
        print(
            f"| {name} | {r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f} | {delta} | {r['masked_token_accuracy']:.3f} |"
        )
    first = next(iter(res.values()))
    print(f"\n{first['rows']} held-out chats, {first['tokens']} response tokens; uniform: {first['uniform_nll']:.2f}")
    (d / "eval" / "table.json").write_text(
        json.dumps({k: {x: v[x] for x in ("nll_bound", "nll_bound_se", "tokens")} for k, v in res.items()}, indent=2)
    )


if __name__ == "__main__":
    main()
