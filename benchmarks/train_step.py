"""Trainer speed, two ratios measured in one run on the same student and batches:

1. steps/s streaming real shards (Parquet -> collate -> step) vs the same steps on batches already in memory
   (goal >= 0.9: the data path must not slow training);
2. the KD step's time over a λ=0 step (goal <= 10%: the sparse KL is cheap next to the student), per tail:
   `--tail bucket` against the same loss with every row's rest mass summed over the vocabulary (the baseline:
   how the bucket was computed before `rest_logmass` took the short route), and `--tail renormalize`.

    python -m benchmarks.train_step SHARDS [--student small] [--batch-size 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ar2mdm.student.model import Student
from ar2mdm.train import losses
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import BatchLoader, TargetSpec, load_shard_manifest
from ar2mdm.train.device import autocast_for
from ar2mdm.train.objective import step_losses
from ar2mdm.train.presets import student_config

DEVICE = "cpu"


def timed_steps(model, opt, batches, cfg, mask_id, *, spec) -> float:
    cuda = DEVICE.startswith("cuda")
    autocast = autocast_for(DEVICE, "auto")
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss, _ = step_losses(model, b.to(DEVICE, non_blocking=True), cfg.objective(spec), spec, mask_id=mask_id)
        loss.backward()
        opt.step()
    if cuda:
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--student", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--device", default="cpu", help="cpu | cuda (bf16 autocast; prints tokens/s and MFU)")
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak for MFU (H100/H200: 989)")
    a = ap.parse_args()
    global DEVICE
    DEVICE = a.device
    shards = Path(a.shards)
    m = load_shard_manifest(shards)
    model = Student(student_config(a.student, m.tokenizer.vocab_size, m.seq_len)).to(a.device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())  # the head counted (tied or not)
    fwd = torch.compile(model) if a.compile else model
    kd_cfg = TrainConfig(shards=str(shards), lam=0.5, tail="bucket")
    mdm_cfg = TrainConfig(shards=str(shards), lam=0.0)
    mask_id = model.config.mask_id
    spec = TargetSpec.from_manifest(m)

    def stream():
        it = iter(BatchLoader(shards, m, 0, 1, 0, batch_size=a.batch_size))
        return (next(it) for _ in range(a.steps))

    in_memory = list(stream())
    timed_steps(fwd, opt, in_memory[:2], kd_cfg, mask_id, spec=spec)  # warm-up
    t_mem = timed_steps(fwd, opt, in_memory, kd_cfg, mask_id, spec=spec)
    t_stream = timed_steps(fwd, opt, stream(), kd_cfg, mask_id, spec=spec)
    t_mdm = timed_steps(fwd, opt, in_memory, mdm_cfg, mask_id, spec=spec)
    t_kd = timed_steps(fwd, opt, in_memory, kd_cfg, mask_id, spec=spec)
    t_kd2 = timed_steps(
        fwd,
        opt,
        in_memory,
        TrainConfig(shards=str(shards), lam=0.5, tail="bucket", temperature=2.0),
        mask_id,
        spec=spec,
    )
    t_ren = timed_steps(
        fwd, opt, in_memory, TrainConfig(shards=str(shards), lam=0.5, tail="renormalize"), mask_id, spec=spec
    )
    short = losses.COMPLEMENT_MAX_MASS
    losses.COMPLEMENT_MAX_MASS = 1e-300  # every row takes the summed route
    t_sum = timed_steps(fwd, opt, in_memory, kd_cfg, mask_id, spec=spec)
    losses.COMPLEMENT_MAX_MASS = short
    print(
        f"student={a.student} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M batch={a.batch_size} "
        f"seq_len={m.seq_len} steps={a.steps}"
    )
    print(f"in-memory batches : {a.steps / t_mem:6.2f} steps/s")
    print(f"streaming shards  : {a.steps / t_stream:6.2f} steps/s")
    print(f"streaming / in-memory steps/s ratio: {t_mem / t_stream:.3f} (goal >= 0.9)")
    tokens = a.steps * a.batch_size * m.seq_len
    wait = max(0.0, 1 - t_mem / t_stream)
    line = f"streaming: {tokens / t_stream:.0f} tokens/s; waiting for data {wait:.1%} of step time"
    if a.device.startswith("cuda"):
        line += f"; MFU {6 * params * tokens / t_stream / (a.peak_tflops * 1e12):.1%} (6·N per token) on "
        line += torch.cuda.get_device_name()
    print(line)
    ms = lambda t: f"{t / a.steps * 1e3:.1f} ms"  # noqa: E731
    print(f"λ=0 step {ms(t_mdm)}")
    print(f"λ=0.5, T=1, tail bucket      {ms(t_kd)}: KD overhead {100 * (t_kd / t_mdm - 1):+.1f}% (goal <= 10%)")
    print(
        f"λ=0.5, T=1, bucket, summed   {ms(t_sum)}: KD overhead {100 * (t_sum / t_mdm - 1):+.1f}% "
        f"(every row's rest summed over V: the baseline; bucket step speed-up {t_sum / t_kd:.2f}x)"
    )
    print(f"λ=0.5, T=1, tail renormalize {ms(t_ren)}: KD overhead {100 * (t_ren / t_mdm - 1):+.1f}%")
    print(
        f"λ=0.5, T=2, tail bucket      {ms(t_kd2)}: KD overhead {100 * (t_kd2 / t_mdm - 1):+.1f}% "
        "(tempered over the N+1 categories: no second pass over the vocabulary)"
    )


if __name__ == "__main__":
    main()
