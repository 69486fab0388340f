"""Targets for a block student against whole-row targets of the same rows, on the default teacher: target
positions/s and the teacher tokens each computed, measured in the same run.

    python -m benchmarks.block_build [--rows 16] [--seq-len 64] [--block-size 8] [--k 4] [--topk-k 8]

- mc (smc, next-token scores): whole rows (every masked position completed given the whole row's visible tokens)
  against blocks, whose particles start from the clean row's prefix, computed once per row and shared by its
  blocks (`decode.encode`), and against blocks that prefill their own prefix (what the sharing saves).
- topk: rescoring windows to the row's end against windows to the block's end.

The rows and masks are the build's own (`benchmarks.common.benchmark_rows`): a block build draws one mask ratio per
block, so the masked positions differ between the two; target positions/s compares them.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import TokenCounter, benchmark_rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--block-size", type=int, default=8)
    ap.add_argument("--k", type=int, default=4, help="mc: particles")
    ap.add_argument("--topk-k", type=int, default=8, help="topk: candidates")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args()

    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.decode import decoder_for
    from ar2mdm.precompute.mc.estimators import _row_targets, by_block, mc_targets
    from ar2mdm.precompute.mc.particles import McSettings
    from ar2mdm.precompute.teacher import TorchTeacher, resolve_teacher
    from ar2mdm.precompute.topk import rescore

    folder, _ = resolve_teacher(None)
    teacher = TorchTeacher.load(folder, a.device, "float32")
    model = teacher.model
    counter = TokenCounter(model)
    rows_of = {}
    for name, b in (("whole rows", None), (f"blocks of {a.block_size}", a.block_size)):
        ids, masks = benchmark_rows(BuildConfig(seq_len=a.seq_len, max_sequences=a.rows, block_size=b), folder)
        rows_of[name] = (torch.as_tensor(ids, dtype=torch.long, device=a.device), masks, b)
    s = McSettings(k=a.k, weights="smc", top_n=16)
    seeds = list(range(a.rows))
    dec = decoder_for(model, a.seq_len)
    results = []

    def timed(label: str, positions: int, fn) -> None:
        counter.tokens = 0
        t0 = time.perf_counter()
        fn()
        sec = time.perf_counter() - t0
        results.append((label, positions, sec, counter.tokens))
        print(f"[{label}: {sec:.1f} s]", flush=True)

    _ = mc_targets(model, rows_of["whole rows"][0][:1], rows_of["whole rows"][1][:1], [0], s, decoder=dec)  # warm-up
    for name, (x, masks, b) in rows_of.items():
        n = sum(len(m) for m in masks)
        timed(f"mc, {name}", n, lambda: mc_targets(model, x, masks, seeds, s, block_size=b, decoder=dec))
        if b is not None:
            own = [np.asarray(m, np.int64) for m in masks]

            def unshared():
                return by_block(lambda r, sub, m, sd: _row_targets(model, dec, sub, m, sd, s=s), x, own, seeds, b)

            timed(f"mc, {name}, each block's prefix prefilled", n, unshared)
    for name, (x, masks, b) in rows_of.items():
        pos = [torch.as_tensor(m) for m in masks]
        n = sum(len(m) for m in masks)
        timed(
            f"topk, {name}",
            n,
            lambda: rescore(teacher.scorer(4096), x.cpu(), pos, k=a.topk_k, window=None, block_size=b),
        )

    print(
        f"\ndefault teacher on {a.device} ({torch.get_num_threads()} threads); {a.rows} rows of {a.seq_len} tokens, "
        f"mc smc K={a.k}, topk K={a.topk_k}"
    )
    print(f"{'':48} {'positions':>9} {'seconds':>8} {'positions/s':>11} {'teacher tokens':>14} {'tokens/position':>15}")
    for label, n, sec, tok in results:
        print(f"{label:48} {n:>9} {sec:>8.1f} {n / sec:>11.2f} {tok:>14} {tok / n:>15.1f}")
    by = {label: (n / sec, tok / n) for label, n, sec, tok in results}
    blk = f"blocks of {a.block_size}"
    for mode in ("mc", "topk"):
        w, bl = by[f"{mode}, whole rows"], by[f"{mode}, {blk}"]
        print(
            f"{mode}: blocks / whole rows: {bl[0] / w[0]:.2f}x the positions/s, "
            f"{bl[1] / w[1]:.2f}x the teacher tokens a position"
        )
    own = by[f"mc, {blk}, each block's prefix prefilled"]
    print(f"mc: the shared prefix: {by[f'mc, {blk}'][0] / own[0]:.2f}x the positions/s of prefilling each block's own")


if __name__ == "__main__":
    main()
