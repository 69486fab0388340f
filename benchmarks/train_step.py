"""Trainer speed, two ratios measured in one run on the same student and batches:

1. steps/s streaming real shards (Parquet -> collate -> step) vs the same steps on batches already in memory
   (goal >= 0.9: the data path must not slow training);
2. the KD step's time over a λ=0 step (goal <= 10%: the sparse KL is cheap next to the student).

    python benchmarks/train_step.py SHARDS [--student small] [--batch-size 16] [--steps 20]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import BatchLoader
from ar2mdm.train.loop import load_shard_manifest, step_losses
from ar2mdm.train.model import Student, StudentConfig


def timed_steps(model, opt, batches, cfg, mask_id) -> float:
    t0 = time.perf_counter()
    for b in batches:
        opt.zero_grad(set_to_none=True)
        loss, _ = step_losses(model, b, cfg, mask_id)
        loss.backward()
        opt.step()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("shards")
    ap.add_argument("--student", default="small")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--steps", type=int, default=20)
    a = ap.parse_args()
    shards = Path(a.shards)
    m = load_shard_manifest(shards)
    model = Student(StudentConfig.from_spec(a.student, m.tokenizer.vocab_size, m.seq_len))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    kd_cfg = TrainConfig(shards=str(shards), lam=0.5)
    mdm_cfg = TrainConfig(shards=str(shards), lam=0.0)
    mask_id = model.config.mask_id

    def stream():
        it = iter(BatchLoader(shards, m, 0, 1, 0, a.batch_size))
        return (next(it) for _ in range(a.steps))

    in_memory = list(stream())
    timed_steps(model, opt, in_memory[:2], kd_cfg, mask_id)  # warm-up
    t_mem = timed_steps(model, opt, in_memory, kd_cfg, mask_id)
    t_stream = timed_steps(model, opt, stream(), kd_cfg, mask_id)
    t_mdm = timed_steps(model, opt, in_memory, mdm_cfg, mask_id)
    t_kd = timed_steps(model, opt, in_memory, kd_cfg, mask_id)
    t_kd2 = timed_steps(model, opt, in_memory, TrainConfig(shards=str(shards), lam=0.5, temperature=2.0), mask_id)
    print(f"student={a.student} params={sum(p.numel() for p in model.parameters()) / 1e6:.1f}M batch={a.batch_size} "
          f"seq_len={m.seq_len} steps={a.steps}")
    print(f"in-memory batches : {a.steps / t_mem:6.2f} steps/s")
    print(f"streaming shards  : {a.steps / t_stream:6.2f} steps/s")
    print(f"streaming / in-memory steps/s ratio: {t_mem / t_stream:.3f} (goal >= 0.9)")
    print(f"λ=0 step {t_mdm / a.steps * 1e3:.1f} ms, λ=0.5 step {t_kd / a.steps * 1e3:.1f} ms: "
          f"KD overhead at T=1 {100 * (t_kd / t_mdm - 1):+.1f}% (goal <= 10%)")
    print(f"λ=0.5, T=2 step {t_kd2 / a.steps * 1e3:.1f} ms: KD overhead at T=2 {100 * (t_kd2 / t_mdm - 1):+.1f}% "
          "(a second log-softmax over the vocabulary)")


if __name__ == "__main__":
    main()
