"""Top-N vs RS-KD sampled sparse targets at equal bytes, on dense teacher distributions: the
default teacher's next-token distributions p_T(. | x_<i) over its whole vocabulary, on rows of the default
corpus (the fim mode's target has the same form).

Per setting it prints, averaged over positions: entries stored, bytes (int32 id + float16 log-prob, before
compression), KL(stored ‖ q) of one stored target (top-N renormalised, as `--tail renormalize` trains on it;
a sampled target as stored), TV(stored, q), and the bias TV(E[stored], q) (the sampled targets' expectation
estimated over --repeats sampled targets, and over a quarter of them: the figure falls with more repeats, it is
the estimate's noise). Top-N's bias is its dropped tail and stays; sampling has none. --draws: the RS-KD draws per
position compared (`kdtargets build --sparsify sample --draws S`).

    python -m benchmarks.sparsify [--rows 4] [--seq-len 64] [--repeats 64] [--draws 8,16,32,64]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.sparsify import sample_sparse
from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
from ar2mdm.shared.corpus import list_corpus_files
from ar2mdm.shared.defaults import default_corpus
from benchmarks.common import rank_sequences

BYTES_PER_ENTRY = 4 + 2


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=64)
    ap.add_argument("--top-n", default="4,8,16,32")
    ap.add_argument("--draws", default="8,16,32,64")
    a = ap.parse_args()
    folder, _ = resolve_teacher(None)
    ids, _ = rank_sequences(
        BuildConfig(seq_len=a.seq_len, max_sequences=a.rows),
        list_corpus_files(default_corpus()),
        load_tokenizer(folder),
    )
    teacher = TorchTeacher.load(folder, "auto", "auto")
    with torch.no_grad():
        lq = torch.log_softmax(
            teacher.model(torch.as_tensor(ids, dtype=torch.long, device=teacher.device)).logits.float(), -1
        )
    lq = lq[:, :-1].reshape(-1, lq.shape[-1]).double().cpu()  # (P, V): every position of every row
    q = lq.exp()
    P, V = q.shape
    print(
        f"teacher next-token distributions: {P} positions, V = {V}, mean entropy "
        f"{float(-(q * lq).sum(1).mean()):.2f} nats"
    )
    print("\n| target | entries | bytes/pos | KL(stored ‖ q) | TV(stored, q) | bias TV(E[stored], q) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for n in map(int, a.top_n.split(",")):
        top = q.topk(n, dim=1)
        m = top.values.sum(1)  # (P,) mass kept
        kl = float((-m.log()).mean())  # renormalised head vs q: Σ (q/m) log(1/m)
        tv = float((1 - m).mean())  # = TV(q_N/m, q)
        print(f"| top-{n} renormalised | {n} | {n * BYTES_PER_ENTRY} | {kl:.3f} | {tv:.3f} | {tv:.3f} |")
    g = torch.Generator().manual_seed(0)
    all_ids = torch.arange(V)
    for s in map(int, a.draws.split(",")):
        entries, kl, tv, bias, bias_q = [], [], [], [], []
        for p in range(P):
            mean = torch.zeros(V, dtype=torch.float64)
            for d in range(a.repeats):
                if d == a.repeats // 4:  # the estimate from a quarter of the repeats: noise falls as 1/sqrt(repeats)
                    bias_q.append(float(0.5 * (mean * 4 - q[p]).abs().sum()))
                i, lp = sample_sparse(all_ids, lq[p], s, g)
                est = torch.zeros(V, dtype=torch.float64)
                est[torch.as_tensor(i).long()] = torch.as_tensor(lp).double().exp()
                mean += est / a.repeats
                if d == 0:
                    entries.append(len(i))
                    nz = est > 0
                    kl.append(float((est[nz] * (est[nz].log() - lq[p][nz])).sum()))
                    tv.append(float(0.5 * (est - q[p]).abs().sum()))
            bias.append(float(0.5 * (mean - q[p]).abs().sum()))
        e = float(np.mean(entries))
        print(
            f"| sample S={s} | {e:.1f} | {e * BYTES_PER_ENTRY:.0f} | {np.mean(kl):.3f} | {np.mean(tv):.3f} | "
            f"{np.mean(bias):.3f} ({np.mean(bias_q):.3f} from {a.repeats // 4} repeats: sampling noise) |"
        )


if __name__ == "__main__":
    main()
