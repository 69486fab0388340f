"""Where a training step's time goes: the real trainer (`setup_training`: DataLoader, DDP/compile
wrapping, AdamW) on real shards, three ways in one run:

1. throughput: `train_step` as `kdtrain run` calls it, no added syncs: tokens/s, and MFU at 6·N per token
   (N counts every parameter once, the tied head included; attention's L² term is left out);
2. the breakdown: the same steps with a device sync between the phases (data wait, host-to-device copy, forward,
   loss, backward, optimizer), each phase's mean time and share of the synced step;
3. torch.profiler over a few steps: the operators that take the most device (CPU: host) time, as a table.

    python -m benchmarks.train_profile [SHARDS] [--student base] [--batch-size 16] [--steps 20] [--device cuda]

Where SHARDS holds no manifest (or is left out: a temporary folder), topk shards are built there first (L =
--seq-len, --rows rows of this Python's standard library), as `benchmarks/gpu_train.sh` does once for all its runs,
with a random 2-layer teacher of the default teacher's vocabulary (benchmarks/common.py): a step costs the same whatever
the targets' values, so the teacher's depth does not matter here. ``--out DIR`` also writes the profiler's table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

from ar2mdm.train.config import TrainConfig
from ar2mdm.train.device import autocast_for, read_parts
from ar2mdm.train.loop import setup_training, train_step
from ar2mdm.train.losses import corrupt
from ar2mdm.train.objective import batch_loss
from benchmarks.common import random_teacher

PHASES = ("data wait", "copy to device", "forward", "loss", "backward", "optimizer")


def build_shards(out: Path, rows: int, seq_len: int, device: str) -> Path:
    """topk shards of the standard library in ``out`` from a random 2-layer teacher with the default teacher's
    vocabulary (its folder beside ``out``)."""
    import sysconfig

    from ar2mdm.precompute.build import run_build
    from ar2mdm.precompute.config import BuildConfig

    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    teacher = random_teacher("2l", out.with_name(out.name + "-teacher"), dtype)
    cfg = BuildConfig(
        corpus=sysconfig.get_paths()["stdlib"],
        teacher=str(teacher),
        out=str(out),
        mode="topk",
        seq_len=seq_len,
        max_sequences=rows,
        device=device,
        progress=False,
    )
    t0 = time.perf_counter()
    run_build(cfg)
    print(f"(built {rows} rows of topk shards in {time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return Path(cfg.out)


def phased_step(tr, autocast, sync) -> list[float]:
    """One micro-batch and an optimizer step with a sync after each phase: the seconds of each of PHASES (with
    --grad-accum above 1 the optimizer's share is that of a step of one micro-batch)."""
    cfg, times = tr.cfg, []
    t = time.perf_counter()

    def lap():
        nonlocal t
        sync()
        now = time.perf_counter()
        times.append(now - t)
        t = now

    tr.opt.zero_grad(set_to_none=True)
    batch = next(tr.batches)
    lap()
    batch = batch.to(tr.device, non_blocking=True)
    lap()
    with autocast:
        x_t = corrupt(batch.input_ids, batch.mask, tr.model.config.mask_id)
        logits = tr.train_model(x_t, batch.positions, context=batch.input_ids)
        lap()
        loss, parts = batch_loss(logits, batch, tr.objective, tr.spec, tr.step / max(tr.total, 1))
        lap()
    loss.backward()
    lap()
    gnorm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.clip)
    read_parts(parts, gnorm)
    tr.opt.step()
    tr.step += 1
    lap()
    return times


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards", nargs="?", default=None)
    ap.add_argument("--student", default="base")
    ap.add_argument("--batch-size", type=lambda x: x if x == "auto" else int(x), default=16, help="rows, or auto")
    ap.add_argument("--batch-tokens", type=int, default=None, help="tokens per optimizer step (kdtrain's)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=5, help="steps before timing (compilation, allocator)")
    ap.add_argument("--lam", type=float, default=0.5)
    ap.add_argument("--rows", type=int, default=512, help="rows to build when no SHARDS are given")
    ap.add_argument("--seq-len", type=int, default=512, help="of the rows built when no SHARDS are given")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None, help="default: on CUDA")
    ap.add_argument("--num-workers", type=int, default=None, help="default: the trainer's (2 on CUDA, 0 on the CPU)")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    ap.add_argument("--out", default=None, help="a folder for the profiler's table")
    a = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ar2mdm-train-profile-"))
    shards = Path(a.shards) if a.shards else tmp / "shards"
    if not (shards / "manifest.json").exists():
        build_shards(shards, a.rows, a.seq_len, a.device)
    cuda = a.device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    need = 3 * (a.warmup + a.steps) + 4  # the three parts below, each with its warm-up
    cfg = TrainConfig(
        shards=str(shards),
        out=str(tmp / "run"),
        student=a.student,
        batch_size=a.batch_size,
        batch_tokens=a.batch_tokens,
        lam=a.lam,
        steps=need,
        save_every=10**9,
        device=a.device,
        compile=a.compile,
        num_workers=a.num_workers,
        progress=False,
    )
    tr = setup_training(cfg)
    tr.end = need  # no final checkpoint is written: the loop is driven here
    autocast = autocast_for(tr.device, cfg.dtype)
    params = sum(p.numel() for p in tr.model.parameters())
    L = tr.meta["seq_len"]
    name = torch.cuda.get_device_name() if cuda else "CPU"
    compiled = a.compile if a.compile is not None else cuda
    print(
        f"{name}, torch {torch.__version__}; student {a.student} ({params / 1e6:.0f}M), "
        f"batch {tr.cfg.batch_size} x L {L} (x {tr.cfg.grad_accum} micro-batches per step), "
        f"λ = {a.lam}, compile {compiled}, loader workers {'default' if a.num_workers is None else a.num_workers}"
    )

    for _ in range(a.warmup):
        train_step(tr, autocast)
    sync()
    t0 = time.perf_counter()
    tokens = sum(train_step(tr, autocast)[2] for _ in range(a.steps))
    sync()
    sec = time.perf_counter() - t0
    line = f"throughput: {tokens / sec:.0f} tokens/s, {sec / a.steps * 1e3:.1f} ms/step"
    if cuda:
        line += f", MFU {6 * params * tokens / sec / (a.peak_tflops * 1e12):.1%} (6·N per token)"
    print(line)

    for _ in range(a.warmup):
        phased_step(tr, autocast, sync)
    rows = [phased_step(tr, autocast, sync) for _ in range(a.steps)]
    mean = [sum(r[i] for r in rows) / len(rows) for i in range(len(PHASES))]
    total = sum(mean)
    print("\n| phase (synced between phases) | ms/step | share |\n| --- | --- | --- |")
    for p, m in zip(PHASES, mean):
        print(f"| {p} | {m * 1e3:.2f} | {m / total:.1%} |")
    print(f"| all (synced) | {total * 1e3:.2f} | |")

    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        for _ in range(min(a.steps, 5)):
            train_step(tr, autocast)
        sync()
    key = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=key, row_limit=15)
    print(f"\ntorch.profiler, {min(a.steps, 5)} steps, by {key}:\n{table}")
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        (Path(a.out) / "train_profile.txt").write_text(prof.key_averages().table(sort_by=key, row_limit=60))


if __name__ == "__main__":
    main()
