"""topk's host-side packing of one batch, vectorised (`rescoring.pack_segment`) against the per-branch loop it
replaced (`tests/precompute/reference.py`), measured in the same run. On a GPU this host time is not hidden:
the forward of the packed batch waits for it.

    python -m benchmarks.topk_pack [--rows 8 --seq-len 512 --positions 256 --k 8 --window 16]
"""

from __future__ import annotations

import argparse
import time

import torch

from ar2mdm.precompute.topk import Branch
from ar2mdm.precompute.tree import _segments, pack_segment
from tests.precompute.reference import pack_segment_loop


def pack_all(x, branches, pack) -> tuple[float, int]:
    t0 = time.perf_counter()
    by_row: dict[int, list[Branch]] = {}
    for br in branches:
        by_row.setdefault(br.row, []).append(br)
    tokens = 0
    for row, brs in by_row.items():
        for seg in _segments(sorted(brs, key=lambda b: b.pos), 1024):
            tokens += len(pack(x[row], seg).tokens)
    return time.perf_counter() - t0, tokens


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--positions", type=int, default=256, help="target positions per row (t = 0.5 at L = 512)")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    L = a.seq_len
    x = torch.randint(0, 49152, (a.rows, L), generator=g)
    branches, out = [], 0
    for b in range(a.rows):
        for i in (torch.randperm(L - 2, generator=g)[: a.positions] + 1).sort().values.tolist():
            for _ in range(a.k + 1):
                branches.append(
                    Branch(b, i, int(torch.randint(0, 49152, (1,), generator=g)), min(L - 1 - i, a.window), out)
                )
                out += 1
    new, tokens = min(pack_all(x, branches, pack_segment) for _ in range(3))
    old, _ = min(pack_all(x, branches, pack_segment_loop) for _ in range(3))
    print(f"{len(branches)} branches, {tokens} packed tokens (rows {a.rows}, L {L}, K {a.k}, W {a.window}), best of 3")
    print(f"vectorised {new * 1e3:.0f} ms, per-branch loop {old * 1e3:.0f} ms: {old / new:.1f}x")


if __name__ == "__main__":
    main()
