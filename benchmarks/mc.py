"""MC completions: the cached sampler (shared prefix, one prefill per visible run) vs a naive per-sample loop
(a full forward of x_<j for every sample and masked position), same rows, same run, default teacher.

    python benchmarks/mc.py [--rows 2] [--k 8] [--seq-len 128] [--t 0.3]
"""

from __future__ import annotations

import argparse
import time

import torch

from ar2mdm.precompute.build import rank_sequences
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.mc import sample_completions, sample_completions_naive
from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
from ar2mdm.shared.corpus import list_corpus_files
from ar2mdm.shared.defaults import default_corpus


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--t", type=float, default=0.3, help="masking ratio of the benchmark rows")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    a = ap.parse_args()
    folder, _ = resolve_teacher(None)
    ids, _ = rank_sequences(
        BuildConfig(seq_len=a.seq_len, max_sequences=a.rows),
        list_corpus_files(default_corpus()),
        load_tokenizer(folder),
    )
    teacher = TorchTeacher.load(folder, a.device, a.dtype)
    g = torch.Generator().manual_seed(0)
    rows = []
    for x in ids:
        m = (torch.rand(a.seq_len, generator=g) < a.t).nonzero()[:, 0]
        rows.append((torch.as_tensor(x, dtype=torch.long, device=teacher.device), [int(i) for i in m if i >= 1]))
    sync = torch.cuda.synchronize if teacher.device.startswith("cuda") else (lambda: None)
    gen = torch.Generator(device=teacher.device).manual_seed(0)
    sample_completions(teacher.model, rows[0][0][:16], [j for j in rows[0][1] if j < 16] or [1], 2, 1.0, gen)  # warm-up
    sync()
    t0 = time.perf_counter()
    for x, m in rows:
        sample_completions(teacher.model, x, m, a.k, 1.0, gen)
    sync()
    t_fast = time.perf_counter() - t0
    t0 = time.perf_counter()
    for x, m in rows:
        sample_completions_naive(teacher.model, x, m, a.k, 1.0, gen)
    sync()
    t_naive = time.perf_counter() - t0
    n_mask = sum(len(m) for _, m in rows)
    fast_tokens = sum(m[0] + a.k * (a.seq_len - m[0]) for _, m in rows)  # prefix once + K x the rest
    naive_tokens = a.k * sum(sum(m) for _, m in rows)  # a forward of x_<j per sample and masked j
    print(f"device={teacher.device} rows={len(rows)} L={a.seq_len} K={a.k} masked positions={n_mask}")
    print(
        f"cached sampler : {t_fast:7.2f} s  {len(rows) / t_fast:6.3f} MC rows/s  {fast_tokens / t_fast:7.0f} teacher "
        f"tok/s"
    )
    print(
        f"naive loop     : {t_naive:7.2f} s  {len(rows) / t_naive:6.3f} MC rows/s  {naive_tokens / t_naive:7.0f} "
        f"teacher tok/s"
    )
    print(f"speed-up (naive / cached): {t_naive / t_fast:.2f}x")


if __name__ == "__main__":
    main()
