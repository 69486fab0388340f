"""collate (shard rows -> a padded Batch) against the per-position loop it replaced, same rows, same run.

    python -m benchmarks.collate [--batch-size 16] [--seq-len 512] [--top-n 16]

Rows are synthetic in the shape the trainer streams (t ~ U(0, 1) of the positions masked, a target at each masked
position with top-n entries): what one batch costs the data path, in ms, and the batches/s one loader worker
can feed.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from ar2mdm.train.data import Row, TargetSpec, collate
from tests.train.test_collate import reference_collate


def rows(n: int, L: int, top_n: int, g) -> list[Row]:
    out = []
    for i in range(n):
        masked = np.flatnonzero(g.random(L) < g.random())
        masked = masked[masked > 0]
        eo = np.arange(len(masked) + 1, dtype=np.int64) * top_n
        out.append(
            Row(
                str(i),
                g.integers(3, 49152, L).astype(np.int32),
                0,
                0.5,
                masked,
                masked.astype(np.int32),
                eo,
                g.integers(0, 49152, eo[-1]).astype(np.int32),
                np.log(g.random(eo[-1])).astype(np.float32),
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--top-n", type=int, default=16)
    ap.add_argument("--batches", type=int, default=20)
    a = ap.parse_args()
    g = np.random.default_rng(0)
    spec = TargetSpec(top_n=a.top_n, eos_id=2, logprob_dtype="float16", exact_support=False)
    batches = [rows(a.batch_size, a.seq_len, a.top_n, g) for _ in range(a.batches)]
    masked = sum(len(r.mask_positions) for b in batches for r in b) / len(batches)
    times = {}
    for name, fn in [("vectorised", collate), ("per-position loop", reference_collate)]:
        fn(batches[0], spec)
        t0 = time.perf_counter()
        for b in batches:
            fn(b, spec)
        times[name] = (time.perf_counter() - t0) / len(batches)
    print(f"batch {a.batch_size} x L={a.seq_len}, top-n {a.top_n}, {masked:.0f} masked positions per batch")
    for name, sec in times.items():
        print(f"{name:24s} {sec * 1e3:8.2f} ms per batch  {1 / sec:8.1f} batches/s per worker")
    print(f"speed-up: {times['per-position loop'] / times['vectorised']:.1f}x")


if __name__ == "__main__":
    main()
