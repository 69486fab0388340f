"""The figure of docs/results.md: held-out gain of KD over plain MDM, per target mode and regime, per seed.

    python scripts/results_plot.py --out docs/results.png \
        "LABEL|REGIME|BASE_RUN|KD_RUN" ...      # {seed} in a run path is replaced by each --seeds value

Each Δ is the paired difference nll_bound(KD run) - nll_bound(λ = 0 run, same seed) over the same held-out rows
and masks (both runs' eval.json), with its standard error, as in the sweep tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ar2mdm.train.sweep import paired_diff


def paired(kd_run: str, base_run: str) -> tuple[float, float]:
    """Paired Δ (and s.e.) of a KD run against its λ = 0 run; one line naming the runs if they differ in rows."""
    a, b = (json.loads((Path(p) / "eval.json").read_text()) for p in (kd_run, base_run))
    if len(a["row_nll"]) != len(b["row_nll"]):
        raise SystemExit(f"{kd_run} and {base_run} were evaluated on different rows: no paired difference")
    return paired_diff(a, b)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("entries", nargs="+", help="LABEL|REGIME|BASE_RUN|KD_RUN")
    ap.add_argument("--out", required=True)
    ap.add_argument("--seeds", default="0,1")
    a = ap.parse_args()
    seeds = [int(s) for s in a.seeds.split(",")]
    rows = []  # (label, regime, [(Δ, se) per seed])
    for e in a.entries:
        label, regime, base, kd = e.split("|")
        rows.append((label, regime, [paired(kd.format(seed=s), base.format(seed=s)) for s in seeds]))
        print(f"{label:32s} {regime:14s} " + "  ".join(f"{d:+.3f} ± {se:.3f}" for d, se in rows[-1][2]))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    regimes = list(dict.fromkeys(r[1] for r in rows))
    labels = list(dict.fromkeys(r[0] for r in rows))
    fig, ax = plt.subplots(figsize=(11, 0.45 * len(rows) + 0.3 * len(regimes) + 1.4))  # a line per entry
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    y, ticks, names = 0, [], []
    for gi, regime in enumerate(regimes):
        for label in labels:
            hit = [r for r in rows if r[0] == label and r[1] == regime]
            if not hit:
                continue
            ds = hit[0][2]
            mean = sum(d for d, _ in ds) / len(ds)
            ax.barh(y, mean, color=colors[gi % len(colors)], alpha=0.35, height=0.7)
            for k, (d, se) in enumerate(ds):
                ax.errorbar(
                    d, y + (k - (len(ds) - 1) / 2) * 0.22, xerr=se, fmt="o", ms=3.5, color=colors[gi % len(colors)]
                )
            ticks.append(y)
            names.append(f"{label} ({regime})")
            y += 1
        y += 0.5
    ax.axvline(0, color="black", lw=0.8)
    ax.set_yticks(ticks, names)
    ax.invert_yaxis()
    ax.set_xlabel(
        "held-out nll_bound: KD (λ = 0.5) − plain MDM (λ = 0), nats/token\n(bars: mean of the seeds; dots: each seed "
        "± paired s.e.)"
    )
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(a.out, dpi=110)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
