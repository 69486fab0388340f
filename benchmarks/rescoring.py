"""Top-K rescoring: packed tree-attention implementation vs naive recomputation, same rows, same run.

    python -m benchmarks.rescoring [--rows 2] [--positions 16] [--seq-len 128] [--k 8] [--window 16]

Prints both timings, teacher tokens/s, the speed ratio and the largest difference between the two targets.
Uses the embedded default teacher (SmolLM2-135M-Instruct) and the default corpus.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
from ar2mdm.precompute.topk import rescore
from ar2mdm.shared.corpus import list_corpus_files
from ar2mdm.shared.defaults import default_corpus
from benchmarks.common import rank_sequences
from tests.precompute.reference import rescore_naive


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--positions", type=int, default=16, help="target positions per row")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()

    folder, _ = resolve_teacher(None)
    tok = load_tokenizer(folder)
    cfg = BuildConfig(seq_len=a.seq_len, max_sequences=a.rows)
    ids, _ = rank_sequences(cfg, list_corpus_files(default_corpus()), tok)
    teacher = TorchTeacher.load(folder, a.device, a.dtype)
    rng = np.random.default_rng(0)
    positions = [torch.as_tensor(np.sort(rng.choice(np.arange(1, a.seq_len), a.positions, replace=False))) for _ in ids]
    x = torch.as_tensor(ids, dtype=torch.long, device=teacher.device)
    sync = torch.cuda.synchronize if teacher.device.startswith("cuda") else (lambda: None)

    scorer = teacher.scorer(4096)
    rescore(scorer, x[:1].cpu(), [positions[0][:2]], k=a.k, window=a.window)  # warm-up
    sync()
    t0 = time.perf_counter()
    fast = rescore(scorer, x.cpu(), positions, k=a.k, window=a.window)
    sync()
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    slow = rescore_naive(teacher.model, x, positions, a.k, a.window)
    sync()
    t_slow = time.perf_counter() - t0

    diff = max(float((f[1].exp() - s[1].exp()).abs().max()) for f, s in zip(fast, slow))
    same_cands = all(torch.equal(f[0], s[0]) for f, s in zip(fast, slow))
    n_pos = sum(len(p) for p in positions)
    L, K, W = a.seq_len, a.k, a.window
    naive_tokens = sum(min(i + W, L - 1) * (K + 1) + i for p in positions for i in p.tolist())
    print(f"device={teacher.device} dtype={teacher.dtype} rows={len(ids)} L={L} K={K} W={W} target_positions={n_pos}")
    print(f"packed tree attention : {t_fast:8.2f} s  {n_pos / t_fast:7.2f} positions/s")
    print(
        f"naive recomputation   : {t_slow:8.2f} s  {n_pos / t_slow:7.2f} positions/s  ({naive_tokens / t_slow:.0f} "
        f"teacher tok/s)"
    )
    print(f"speed-up (naive / packed): {t_slow / t_fast:.2f}x")
    print(f"max |q_packed - q_naive| = {diff:.2e}; same candidates: {same_cands}")


if __name__ == "__main__":
    main()
