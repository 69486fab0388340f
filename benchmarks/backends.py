"""Backends and plans on the default teacher, one shard, same rows and masks, same run.

Per mode and plan: target positions/s, the teacher tokens the engine computed (vLLM's own counters: prompt
tokens not served by the prefix cache + generated tokens) over the bound, and engine calls for the shard.

- topk: torch packed (the reference), vLLM "uncached" (prompt log-probs of [x_<i, v, window], every prefix
  recomputed), vLLM "cached" (the same requests reading the prefix cache; the true token's branch read off the
  first pass). Bound per row: L + Σ_i (K+1)·(n_i+1), every prefix free.
- mc: torch (`particles`: every row's K particles in one forward per position), vLLM "forced" (every (row,
  sample) of the shard in flight; smc: one call per span). Bound per row: K·L. The torch sampler against rows
  one at a time: benchmarks/mc.py.

    python -m benchmarks.backends [--rows 4] [--seq-len 128] [--k 8] [--window 16] [--mc-k 8] [--weights smc]

Engine start-up is excluded from the timings (reported separately). Without vLLM installed (or with
--no-vllm) only the torch rows run. On a GPU: ``bash benchmarks/gpu.sh`` (CUDA, bf16, with tokens/s and MFU:
2·params·tokens/s over the device's dense bf16 peak; torch rows count the bound as their tokens).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
import torch

from benchmarks.common import benchmark_rows


def tv(a, b) -> float:
    """Max TV between two lists of per-row (cand, logq) results with equal candidates."""
    return max(float(0.5 * (x[1].exp() - y[1].exp()).abs().sum(-1).max()) for x, y in zip(a, b))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--mc-k", type=int, default=8)
    ap.add_argument("--weights", default="smc")
    ap.add_argument("--skip", default="", help="comma-separated plans to skip, e.g. 'topk vllm uncached'")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--no-vllm", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense peak for MFU (default: H100/H200 bf16 989)")
    a = ap.parse_args()

    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.mc.particles import McSettings
    from ar2mdm.precompute.teacher import TorchTeacher, resolve_teacher
    from ar2mdm.precompute.topk import rescore
    from ar2mdm.precompute.vllm_backend import VllmTeacher, vllm_available

    folder, _ = resolve_teacher(None)
    cfg = BuildConfig(seq_len=a.seq_len, max_sequences=a.rows)
    ids, masks = benchmark_rows(cfg, folder)  # the build's own rows and masks
    n_pos = sum(len(m) for m in masks)
    L, K, W, MK = a.seq_len, a.k, a.window, a.mc_k
    seeds = list(range(len(ids)))
    bound = {"topk": sum(L + sum((K + 1) * (min(W, L - 1 - i) + 1) for i in m) for m in masks), "mc": len(ids) * MK * L}
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    rows, out = [], {}

    def run(name, mode, fn, engine=None):
        if name in skip:
            return
        c0 = engine.counters() if engine else None
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out[name] = fn()
        if a.device.startswith("cuda"):
            torch.cuda.synchronize()
        sec = time.perf_counter() - t0
        c1 = engine.counters() if engine else None
        tok = c1["computed_tokens"] - c0["computed_tokens"] if engine else None
        calls = c1["engine_calls"] - c0["engine_calls"] if engine else None
        rows.append((name, mode, sec, tok, calls))
        print(f"[{name}: {sec:.1f}s, {tok} engine tokens, {calls} calls]", file=sys.stderr, flush=True)

    def topk(teacher, **scorer):
        x, pos = torch.as_tensor(np.asarray(ids), dtype=torch.long), [torch.as_tensor(m) for m in masks]
        return rescore(teacher.scorer(4096, **scorer), x, pos, k=K, window=W)

    hf = TorchTeacher.load(folder, a.device, a.dtype)
    params = sum(p.numel() for p in hf.model.parameters())
    mc = McSettings(k=MK, score="next-token", weights=a.weights, top_n=16, rescore_k=4)
    run("topk torch packed", "topk", lambda: topk(hf))
    run("mc torch", "mc", lambda: hf.mc_batch(ids, [m.tolist() for m in masks], seeds, mc))
    hf = None  # frees the torch teacher before vLLM loads (the lambdas above have run)
    peak = a.peak_tflops
    if (
        peak is None
        and a.device.startswith("cuda")
        and any(g in torch.cuda.get_device_name() for g in ("H100", "H200"))
    ):
        peak = 989.0
    vllm = not a.no_vllm and vllm_available()
    if not vllm:
        return report(
            a,
            rows,
            bound=bound,
            n_pos=n_pos,
            L=L,
            K=K,
            W=W,
            MK=MK,
            n_rows=len(ids),
            start=None,
            params=params,
            peak=peak,
            out=out,
        )

    t0 = time.perf_counter()
    vt = VllmTeacher.load(folder, {}, 64, 0)
    start = time.perf_counter() - t0
    rescore(vt.scorer(), torch.as_tensor(np.asarray(ids[:1])), [torch.as_tensor(masks[0])], k=K, window=W)  # warm-up
    vt.mc_batch(ids[:1], [masks[0].tolist()[:4]], [99], mc)
    run("topk vllm uncached", "topk", lambda: topk(vt, read_cache=False), vt)
    run("topk vllm cached", "topk", lambda: topk(vt), vt)
    run("mc vllm forced", "mc", lambda: vt.mc_batch(ids, [m.tolist() for m in masks], seeds, mc), vt)
    vt.close()

    report(
        a,
        rows,
        bound=bound,
        n_pos=n_pos,
        L=L,
        K=K,
        W=W,
        MK=MK,
        n_rows=len(ids),
        start=start,
        params=params,
        peak=peak,
        out=out,
    )


def report(a, rows, *, bound, n_pos, L, K, W, MK, n_rows, start, params, peak, out) -> None:
    print(
        f"default teacher ({params / 1e6:.0f}M parameters), {a.device} {a.dtype}, one shard: rows={n_rows} L={L}; "
        f"topk K={K} W={W}; mc K={MK} --mc-weights {a.weights} next-token; target positions={n_pos}"
        + (f"; vLLM engine start {start:.1f}s" if start is not None else "; vLLM not run")
    )
    print(
        f"{'plan':26s} {'seconds':>8s} {'pos/s':>8s} {'engine tokens':>14s} {'/ bound':>8s} {'calls':>6s} "
        f"{'tok/s':>9s} {'MFU':>6s}"
    )
    base = {m: sec for name, m, sec, _, _ in rows if name in ("topk torch packed", "mc torch")}
    for name, mode, sec, tok, calls in rows:
        extra = f"  {base[mode] / sec:.2f}x torch" if mode in base and "torch" not in name else ""
        tps = (tok if tok else bound[mode]) / sec  # torch: the bound (its plans compute about that)
        mfu = f"{2 * params * tps / (peak * 1e12):.1%}" if peak else "-"
        print(
            f"{name:26s} {sec:8.2f} {n_pos / sec:8.2f} {tok if tok is not None else '-':>14} "
            f"{(f'{tok / bound[mode]:.2f}' if tok else '-'):>8s} {calls if calls is not None else '-':>6} "
            f"{tps:9.0f} {mfu:>6s}{extra}"
        )
    for old, new in [("topk vllm uncached", "topk vllm cached")]:
        t = {n: s for n, _, s, _, _ in rows}
        if old in t and new in t:
            print(f"{new} / {old}: {t[old] / t[new]:.2f}x faster")
    if "topk torch packed" in out and "topk vllm cached" in out:
        print(f"topk parity vLLM cached vs torch: max TV {tv(out['topk torch packed'], out['topk vllm cached']):.2e}")
    print(f"bounds (tokens): topk {bound['topk']}, mc {bound['mc']}")


if __name__ == "__main__":
    main()
