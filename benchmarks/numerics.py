"""Half-precision against fp32 targets of the same teacher, rows and masks: TV between the stored
targets (each a sparse distribution over the vocabulary), mean, median, p99 and max, per mode and dtype; mc also
against fp32 with other random draws (its own sampling noise, the floor a numerics difference is read against).

    python -m benchmarks.numerics [--rows 4] [--seq-len 128] [--modes topk,mc] [--dtypes bfloat16,float16]

Runs on the CPU (half precision is slow there but computes the same roundings) or on CUDA (``--device cuda``).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import benchmark_rows


def dense(ids, lps, V: int) -> np.ndarray:
    out = np.zeros(V)
    out[np.asarray(ids, dtype=np.int64)] = np.exp(np.asarray(lps, dtype=np.float64))
    return out


def tv_stats(a: list[np.ndarray], b: list[np.ndarray]) -> str:
    t = np.asarray([0.5 * np.abs(x - y).sum() for x, y in zip(a, b)])
    return f"mean {t.mean():.4f}  median {np.median(t):.4f}  p99 {np.quantile(t, 0.99):.4f}  max {t.max():.4f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--mc-k", type=int, default=8)
    ap.add_argument("--modes", default="topk,mc")
    ap.add_argument("--dtypes", default="bfloat16,float16")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.mc.particles import McSettings
    from ar2mdm.precompute.teacher import TorchTeacher, resolve_teacher
    from ar2mdm.precompute.topk import rescore

    folder, _ = resolve_teacher(None)
    cfg = BuildConfig(seq_len=a.seq_len, max_sequences=a.rows)
    ids, masks = benchmark_rows(cfg, folder)  # the build's own rows and masks
    modes = a.modes.split(",")
    mc = McSettings(k=a.mc_k, top_n=16)

    def targets(teacher, mode, seeds=None) -> list[np.ndarray]:
        V = teacher.model.config.vocab_size
        if mode == "topk":
            x, pos = torch.as_tensor(np.asarray(ids), dtype=torch.long), [torch.as_tensor(m) for m in masks]
            res = rescore(teacher.scorer(4096), x, pos, k=a.k, window=a.window)
            return [dense(c[p], lq[p], V) for c, lq in res for p in range(len(c))]
        res = teacher.mc_batch(list(ids), [m.tolist() for m in masks], seeds or list(range(len(ids))), mc)
        return [dense(i, lp, V) for r in res for i, lp in zip(r.ids, r.logprobs)]

    t0 = time.perf_counter()
    ref_t = TorchTeacher.load(folder, a.device, "float32")
    ref = {m: targets(ref_t, m) for m in modes}
    noise = targets(ref_t, "mc", [1000 + r for r in range(len(ids))]) if "mc" in modes else None
    del ref_t
    print(
        f"default teacher, {a.device}; {len(ids)} rows L={a.seq_len}; topk K={a.k} W={a.window}; mc K={a.mc_k} smc "
        f"next-token; {sum(len(m) for m in masks)} target positions"
    )
    for dtype in a.dtypes.split(","):
        half = TorchTeacher.load(folder, a.device, dtype)
        for m in modes:
            print(f"{m:5s} {dtype:8s} vs fp32:           {tv_stats(targets(half, m), ref[m])}")
        del half
    if noise is not None:
        print(f"mc    float32 other draws vs fp32: {tv_stats(noise, ref['mc'])}  (sampling noise)")
    print(f"({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
