"""Whole `kdtargets build` runs as the CLI runs them (`run_build`), teacher load timed apart: target positions/s,
teacher tokens/s, MFU and, for mc, the fraction of the memory-bandwidth limit.

    python -m benchmarks.build_speed --shape 135m --mode mc --rows 1024 [--seq-len 512 --k 8 --window 16]
    python -m benchmarks.build_speed --teacher FOLDER_OR_GGUF --mode topk --rows 256 -- --token-budget 65536

``--shape 135m|1.7b|8b``: a random-initialised teacher of that shape with the default teacher's tokenizer, saved to
a temporary folder (throughput does not depend on the weights' values). Teacher tokens: topk L + Σ_i (K+1)(n_i+1)
per row over the positions with n_i > 0 (n_i = `shared.blocks.right_context`; left-only targets run no branch), mc
K·L per row, fim one prompt per position (counted as its
length). MFU =
2·params·tokens/s over the dense bf16 peak (989 TFLOP/s for H100/H200). Settings after ``--`` go to BuildConfig as
``--name value`` pairs (``--batch-size 64``).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from ar2mdm.precompute.mc.particles import kv_bytes_per_position
from ar2mdm.shared.blocks import right_context
from benchmarks.common import SHAPES, copy_bandwidth, random_teacher


def teacher_tokens(cfg, data) -> int:
    L = cfg.seq_len
    if cfg.mode == "mc":
        return data.rows * cfg.k * L
    n = 0
    for r in range(data.rows):
        pos = data.target_positions[data.target_offsets[r] : data.target_offsets[r + 1]]
        if cfg.mode == "topk":
            # K+1 branches of 1 + n tokens a position; with no right context (n = 0) no branch is run
            right = [right_context(int(i), L, cfg.right_window, cfg.target_block_size) for i in pos]
            n += L + sum((cfg.k + 1) * (r + 1) for r in right if r)
        else:
            n += sum(L for _ in pos)
    return n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default=None, choices=list(SHAPES))
    ap.add_argument("--teacher", default=None, help="a teacher folder or GGUF instead of --shape (default teacher)")
    ap.add_argument("--mode", default="mc")
    ap.add_argument("--rows", type=int, default=64)
    ap.add_argument("--corpus", default=None, help="default: the bundled Shakespeare (too short for 1,024 rows of 512)")
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--window", type=int, default=16)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    ap.add_argument("--peak-tflops", type=float, default=989.0)
    ap.add_argument("extra", nargs="*", help="more BuildConfig settings after --, as --name value pairs")
    a = ap.parse_args()
    dtype = a.dtype or ("bfloat16" if a.device.startswith("cuda") else "float32")

    from ar2mdm.precompute.autosize import auto_batch_size
    from ar2mdm.precompute.build import load_backend, run_build
    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.plan import plan_build
    from ar2mdm.shared.shards import read_shard
    from ar2mdm.shared.validate import validate_dir

    tmp = Path(tempfile.mkdtemp(prefix="ar2mdm-speed-"))
    teacher = a.teacher
    if a.shape:
        teacher = str(random_teacher(a.shape, tmp / f"teacher-{a.shape}", dtype))
    extra = {}
    for name, value in zip(a.extra[::2], a.extra[1::2]):
        field = name.removeprefix("--").replace("-", "_")
        extra[field] = type(BuildConfig.__dataclass_fields__[field].default or 0)(value)
    cfg = BuildConfig(
        corpus=a.corpus,
        teacher=teacher,
        out=str(tmp / "out"),
        mode=a.mode,
        seq_len=a.seq_len,
        k=a.k,
        window=a.window,
        max_sequences=a.rows,
        seqs_per_shard=a.rows,
        device=a.device,
        dtype=dtype,
        progress=False,
        **extra,
    )
    plan = plan_build(cfg)
    cuda = a.device.startswith("cuda")
    t0 = time.perf_counter()
    engine = load_backend(plan.backend, cfg, plan.folder)
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    s = run_build(cfg, teacher=engine)
    if cuda:
        torch.cuda.synchronize()
    sec = time.perf_counter() - t0
    m = validate_dir(Path(cfg.out))
    data = [read_shard(Path(cfg.out) / sh.file) for sh in m.shards]
    tokens = sum(teacher_tokens(cfg, d) for d in data)
    model = engine.model
    params = sum(p.numel() for p in model.parameters())
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(
        f"{name}, torch {torch.__version__}, {dtype}; teacher {a.shape or a.teacher or 'default'} "
        f"({params / 1e6:.0f}M); --mode {a.mode} L={a.seq_len} K={a.k} W={a.window} {extra or ''}"
    )
    line = (
        f"rows {s.rows}, target positions {s.target_positions}: build {sec:.1f} s (teacher load {load:.1f} s apart), "
        f"{s.target_positions / sec:.0f} positions/s, {tokens / sec:.0f} teacher tokens/s"
    )
    if cuda:
        line += f", MFU {2 * params * tokens / sec / (a.peak_tflops * 1e12):.2%}"
    print(line)
    if cuda and a.mode == "mc":
        elt = next(model.parameters()).element_size()
        per_kv = kv_bytes_per_position(model.config, elt)
        # the least a decode over R rows must read: the weights once per step and each particle's KV cache so far
        first = [int(d.mask_positions[d.mask_offsets[r]]) for d in data for r in range(d.rows)]
        batch = cfg.batch_size or auto_batch_size(cfg, engine)[0] * cfg.masks_per_seq
        steps = int(np.ceil(s.rows / batch)) * (a.seq_len - int(np.mean(first)))
        read = steps * params * elt + sum(a.k * sum(range(f, a.seq_len)) * per_kv for f in first)
        bw = copy_bandwidth(a.device)
        print(
            f"memory-bandwidth limit {read / bw:.2f} s ({read / 1e9:.0f} GB at {bw / 1e12:.2f} TB/s): "
            f"{read / bw / sec:.1%} of it"
        )
    engine.close()


if __name__ == "__main__":
    main()
