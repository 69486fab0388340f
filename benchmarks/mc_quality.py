"""How good are Monte Carlo targets, per estimator, on real text: the default teacher, rows and masks
drawn exactly as `kdtargets build --mode mc` draws them (t ~ U(eps, 1) per row, the row's seed).

Per estimator (weights x score) it prints, over every masked position of the rows:
  p(true)      the probability of the row's own token in the top 16 entries (what --top-n 16 stores)
  mass@N       the mass the top-N entries of the mixture hold, N = 16 ... 256 (a build drops the rest)
  entropy      of the stored top-N entries (nats)
  ESS end      the effective sample size of the final weights (K for uniform)
  ESS resample the mean ESS just before each resampling (smc), resamplings per row
  TV ref       mean total variation to a reference estimate (--reference-k samples of smc + full-conditional)
  tok/pos      teacher tokens computed per masked position (a forward hook counts every input token)
  s/pos        seconds per masked position on this machine

    python -m benchmarks.mc_quality [--rows 8] [--seq-len 128] [--k 8] [--reference-k 0] [--window 16]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.mc.estimators import mc_targets
from ar2mdm.precompute.mc.particles import McSettings
from ar2mdm.precompute.targets import draw_row_masks
from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
from ar2mdm.shared.corpus import list_corpus_files
from ar2mdm.shared.defaults import default_corpus
from ar2mdm.shared.masking import row_seed
from benchmarks.common import TokenCounter, rank_sequences

ESTIMATORS = [
    ("uniform", "next-token"),
    ("importance", "next-token"),
    ("smc", "next-token"),
    ("uniform", "full-conditional"),
    ("importance", "full-conditional"),
    ("smc", "full-conditional"),
]


def sparse(ids: torch.Tensor, lps: torch.Tensor) -> dict[int, float]:
    return dict(zip(ids.tolist(), lps.double().exp().tolist()))


def tv(p: dict, q: dict) -> float:
    """Total variation over the union of two stored supports (mass outside both is not compared)."""
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def estimate(teacher, counter, rows, *, weights, score, K, a, salt=":mc") -> tuple[list[list[dict]], dict]:
    """Targets (per row, per masked position, as {id: prob} over the top 256) and the raw statistics."""
    counter.tokens = 0
    out, ess, before, resamples = [], [], [], []
    t0 = time.perf_counter()
    for key, x, masked in rows:
        s = McSettings(
            k=K, score=score, weights=weights, top_n=256, rescore_k=a.rescore_k, window=a.window, smc_ess=a.smc_ess
        )
        res = mc_targets(teacher.model, x[None], [np.asarray(masked)], [row_seed(a.seed, key + salt)], s)[0]
        out.append([sparse(i, lp) for i, lp in zip(res.ids, res.logprobs)])
        ess.append(res.ess)
        before += res.ess_before
        resamples.append(len(res.ess_before))
    return out, dict(
        seconds=time.perf_counter() - t0,
        tokens=counter.tokens,
        ess=float(np.mean(ess)),
        ess_before=float(np.mean(before)) if before else None,
        resamples=float(np.mean(resamples)),
    )


def metrics(targets, rows, stats, reference=None) -> dict:
    ptrue, mass, ent, tvs = [], {16: [], 32: [], 64: [], 128: [], 256: []}, [], []
    for r, (_, x, masked) in enumerate(rows):
        for p, i in enumerate(masked):
            q = targets[r][p]
            probs = sorted(q.values(), reverse=True)
            for n in mass:
                mass[n].append(sum(probs[:n]))
            top = dict(sorted(q.items(), key=lambda kv: -kv[1])[:16])
            ptrue.append(top.get(int(x[i]), 0.0))
            ent.append(-sum(v * np.log(v) for v in top.values() if v > 0))
            if reference is not None:
                tvs.append(tv(q, reference[r][p]))
    n = len(ptrue)
    m = {
        "p_true": float(np.mean(ptrue)),
        **{f"mass@{k}": float(np.mean(v)) for k, v in mass.items()},
        "entropy": float(np.mean(ent)),
        "ess_end": stats["ess"],
        "ess_before_resampling": stats["ess_before"],
        "resamples_per_row": stats["resamples"],
        "tokens_per_position": stats["tokens"] / n,
        "seconds_per_position": stats["seconds"] / n,
        "positions": n,
    }
    if reference is not None:
        m["tv_to_reference"] = float(np.mean(tvs))
    return m


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument(
        "--reference-k", type=int, default=0, help="samples of the smc + full-conditional reference (0: none)"
    )
    ap.add_argument("--rescore-k", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--smc-ess", type=float, default=0.5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--corpus", default=None, help="default: the embedded corpus (Shakespeare's tragedies)")
    ap.add_argument("--estimators", default="all", help="comma-separated weights/score pairs, e.g. smc/next-token")
    ap.add_argument("--json", default=None, help="also write the table as JSON here")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    folder, _ = resolve_teacher(None)
    cfg = BuildConfig(seq_len=a.seq_len, max_sequences=a.rows, seed=a.seed, mode="mc")
    ids, plen = rank_sequences(cfg, list_corpus_files(a.corpus or default_corpus()), load_tokenizer(folder))
    drawn = draw_row_masks(cfg, np.arange(len(ids)), plen)
    keys, masks, src = drawn.example_ids, drawn.masks, drawn.src
    teacher = TorchTeacher.load(folder, a.device, a.dtype)
    counter = TokenCounter(teacher.model)
    rows = [
        (k, torch.as_tensor(ids[s], dtype=torch.long, device=teacher.device), m.tolist())
        for k, m, s in zip(keys, masks, src)
    ]
    todo = ESTIMATORS if a.estimators == "all" else [tuple(e.split("/")) for e in a.estimators.split(",")]
    reference = None
    print(
        f"device={teacher.device} rows={len(rows)} L={a.seq_len} K={a.k} rescore_k={a.rescore_k} window={a.window} "
        f"smc_ess={a.smc_ess} masked positions={sum(len(m) for _, _, m in rows)}",
        flush=True,
    )
    table = {}
    if a.reference_k:
        reference, st = estimate(
            teacher, counter, rows, weights="smc", score="full-conditional", K=a.reference_k, a=a, salt=":reference"
        )
        table[f"reference smc/full-conditional K={a.reference_k}"] = metrics(reference, rows, st)
        print(f"reference K={a.reference_k}: {st['seconds']:.0f} s", flush=True)
    for weights, score in todo:
        targets, st = estimate(teacher, counter, rows, weights=weights, score=score, K=a.k, a=a)
        table[f"{weights}/{score}"] = metrics(targets, rows, st, reference)
        row = {k: round(v, 4) if isinstance(v, float) else v for k, v in table[f"{weights}/{score}"].items()}
        print(f"{weights}/{score}: {json.dumps(row)}", flush=True)
    cols = [
        "p_true",
        "mass@16",
        "mass@64",
        "mass@256",
        "entropy",
        "ess_end",
        "ess_before_resampling",
        "resamples_per_row",
        "tv_to_reference",
        "tokens_per_position",
        "seconds_per_position",
    ]
    print("\n| estimator | " + " | ".join(cols) + " |")
    print("| --- " * (len(cols) + 1) + "|")
    for name, m in table.items():
        cells = [("–" if m.get(c) is None else f"{m[c]:.3g}") for c in cols]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"args": vars(a), "table": table}, f, indent=2)


if __name__ == "__main__":
    main()
