"""Two builds' targets at the same rows and masked positions, by masking level: how far one is from the other.

    python scripts/compare_targets.py REFERENCE OTHER [OTHER ...] [--levels 5] [--rows 128]

Builds of the same corpus, seed, row length, mask settings and block size draw the same masks, so their targets
sit at the same positions (checked). Per bucket of the row's (block's) mask ratio t, for each OTHER against
REFERENCE (e.g. a high-K full-conditional mc build, the best estimate of the teacher's posterior at hand): the mean
KL(reference ‖ other) and total variation over their stored supports (each renormalised), the stored targets'
entropy and the probability they give the true token, and the mass they leave outside their support. Printed as
a markdown table; ``--json FILE`` keeps every figure.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np


def targets_of(folder: Path, rows: int) -> dict:
    """{(example id, position): (ids, probs, t, truth)} of a build's first ``rows`` rows."""
    from ar2mdm.schemas import Manifest
    from ar2mdm.shared.shards import read_shard

    m = Manifest.load(folder)
    size = m.block_size or m.seq_len
    out = {}
    for s in m.shards:
        data = read_shard(folder / s.file)
        for r in range(data.rows):
            if len({e for e, _ in out}) >= rows:
                return out
            pos, ids, lps = data.row_targets(r)
            masked = set(data.row_masks(r).tolist())
            for i, tid, tlp in zip(pos.tolist(), ids, lps):
                if i in masked:
                    t = float(data.block_t[r, i // size]) if data.block_t is not None else float(data.t[r])
                    p = np.exp(tlp.astype(np.float64))
                    out[data.example_ids[r], i] = (tid.astype(np.int64), p, t, int(data.input_ids[r, i]))
    return out


def compare(ref: dict, other: dict, levels: int) -> list[dict]:
    """Per level bucket: mean KL(ref ‖ other) and TV over the union of supports (each renormalised), and both
    targets' entropy, true-token probability and stored mass."""
    keys = sorted(set(ref) & set(other))
    if len(keys) < len(ref):
        raise SystemExit(f"only {len(keys)} of {len(ref)} positions in common: the builds drew other masks")
    sums = [dict(n=0) for _ in range(levels)]
    for k in keys:
        (ri, rp, t, truth), (oi, op, _, _) = ref[k], other[k]
        b = min(levels - 1, int(t * levels))
        vocab = np.union1d(ri, oi)
        pr = np.zeros(len(vocab))
        po = np.zeros(len(vocab))
        pr[np.searchsorted(vocab, ri)] += rp
        po[np.searchsorted(vocab, oi)] += op
        mr, mo = pr.sum(), po.sum()
        pr, po = pr / mr, po / mo
        kl = float(np.sum(pr * (np.log(np.maximum(pr, 1e-300)) - np.log(np.maximum(po, 1e-12)))))
        s = sums[b]
        s["n"] += 1
        for name, v in (
            ("kl", kl),
            ("tv", 0.5 * float(np.abs(pr - po).sum())),
            ("entropy_ref", float(-(pr[pr > 0] * np.log(pr[pr > 0])).sum())),
            ("entropy_other", float(-(po[po > 0] * np.log(po[po > 0])).sum())),
            ("true_ref", float(rp[ri == truth].sum())),
            ("true_other", float(op[oi == truth].sum())),
            ("mass_other", float(mo)),
        ):
            s[name] = s.get(name, 0.0) + v
    out = []
    for b, s in enumerate(sums):
        row = {"level": f"{b / levels:.2f}-{(b + 1) / levels:.2f}", "positions": s["n"]}
        row.update({k: v / s["n"] for k, v in s.items() if k != "n"} if s["n"] else {})
        out.append(row)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reference")
    ap.add_argument("others", nargs="+")
    ap.add_argument("--levels", type=int, default=5)
    ap.add_argument("--rows", type=int, default=128)
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    ref = targets_of(Path(a.reference), a.rows)
    res = {o: compare(ref, targets_of(Path(o), a.rows), a.levels) for o in a.others}
    cols = ["level", "positions", "kl", "tv", "entropy_ref", "entropy_other", "true_ref", "true_other", "mass_other"]
    for o, rows in res.items():
        print(f"\n{o} against {a.reference}:\n")
        print("| " + " | ".join(cols) + " |\n|" + " --- |" * len(cols))
        for r in rows:
            cells = [r.get(c, math.nan) for c in cols]
            print("| " + " | ".join(str(c) if isinstance(c, (str, int)) else f"{c:.3f}" for c in cells) + " |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
