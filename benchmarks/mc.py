"""The mc sampler alone (`particles.sample_particles`): a batch of rows advancing together against the same rows
one at a time, same masks and teacher, same run.

    python -m benchmarks.mc [--rows 8] [--k 8] [--seq-len 128] [--weights smc] [--shape default|135m|1.7b|8b]

Prints seconds, teacher tokens/s (R·p0 + R·K·(L - p0): every token the decode computes), the ratio, and on
CUDA the MFU (2·params·tokens/s over the device's dense bf16 peak) and the fraction of the memory-bandwidth limit:
each decode step must read the weights and every particle's KV cache; the limit is those bytes over the bandwidth
of a device-to-device copy timed in the same run. ``--shape`` other than default: a random-initialised teacher of
that shape with the default teacher's tokenizer (throughput does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ar2mdm.precompute.mc.particles import kv_bytes_per_position
from benchmarks.common import SHAPES, benchmark_rows, copy_bandwidth, random_teacher


def load_teacher(shape: str, device: str, dtype: str):
    """(model, folder): the default teacher, or a random-initialised one of ``shape`` (benchmarks/common.py)."""
    from ar2mdm.precompute.teacher import TorchTeacher, resolve_teacher

    if shape == "default":
        folder, _ = resolve_teacher(None)
    else:
        folder = random_teacher(shape, Path(tempfile.mkdtemp(prefix="ar2mdm-teacher-")), dtype)
    return TorchTeacher.load(folder, device, dtype).model, folder


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--weights", default="smc")
    ap.add_argument("--shape", default="default", choices=["default", *SHAPES])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")

    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.decode import decoder_for
    from ar2mdm.precompute.mc.particles import McSettings, sample_particles

    model, folder = load_teacher(a.shape, a.device, dtype)
    cfg = BuildConfig(seq_len=a.seq_len, max_sequences=a.rows, k=a.k, mode="mc", mc_weights=a.weights)
    ids, masks = benchmark_rows(cfg, folder)
    xs = torch.as_tensor(np.stack(ids), dtype=torch.long, device=a.device)
    R, L, K = xs.shape[0], a.seq_len, a.k
    seeds = list(range(R))
    s = McSettings(k=K, weights=a.weights, top_n=16)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def timed(fn) -> float:
        fn()  # warm-up (allocator, kernels)
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        return time.perf_counter() - t0

    with torch.no_grad():
        new = timed(lambda: sample_particles(decoder_for(model, L), xs, masks, seeds, s))
        alone = timed(
            lambda: [
                sample_particles(decoder_for(model, L), xs[r : r + 1], masks[r : r + 1], seeds[r : r + 1], s)
                for r in range(R)
            ]
        )

    params = sum(p.numel() for p in model.parameters())
    p0 = min(int(m[0]) for m in masks)
    tokens = R * p0 + R * K * (L - p0)
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"{name}, torch {torch.__version__}, {dtype}; teacher {a.shape} ({params / 1e6:.0f}M parameters); rows={R} "
        f"L={L} K={K} --mc-weights {a.weights}; {sum(len(m) for m in masks)} masked positions"
    )
    for label, sec in ((f"{R} rows together", new), ("one row at a time", alone)):
        line = f"{label:28s} {sec:8.2f} s  {tokens / sec:10.0f} teacher tok/s"
        if cuda:
            line += f"  MFU {2 * params * tokens / sec / (a.peak_tflops * 1e12):.2%}"
        print(line)
    print(f"batched / one at a time: {alone / new:.2f}x faster")
    if cuda:
        elt = torch.finfo(getattr(torch, dtype)).bits // 8
        # per decode step j: the weights once, and every particle's KV cache of j positions
        steps = range(p0, L)
        per_kv = kv_bytes_per_position(model.config, elt)
        read = sum(params * elt + R * K * j * per_kv for j in steps)
        bw = copy_bandwidth(a.device)
        print(
            f"memory-bandwidth limit: {read / 1e9:.1f} GB read over {len(steps)} decode steps at {bw / 1e12:.2f} TB/s "
            f"(copy) = {read / bw:.3f} s; the batched sampler reaches {read / bw / new:.1%} of it"
        )


if __name__ == "__main__":
    main()
