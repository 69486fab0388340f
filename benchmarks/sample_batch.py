"""`kdtrain sample --num N`: N samples in batches against the same N drawn one at a time, same run, same seeds.

    python -m benchmarks.sample_batch [--student tiny|small|base] [--num 32] [--batch-size 16] [--length 48]
        [--steps 16] [--remasking random|low-confidence] [--temperature 1] [--device auto]

A random student of the preset's shape with the default teacher's vocabulary (49,152): sampling costs the same
whatever the weights. Both ways draw the same samples (each sample's draws come from its own seed), which is
checked; the figure is samples/s and generated tokens/s of each, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import torch

from ar2mdm.student.denoise import denoise
from ar2mdm.student.model import Student, StudentConfig
from ar2mdm.train.presets import PRESETS


def timed(fn) -> tuple[torch.Tensor, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="tiny", choices=list(PRESETS))
    ap.add_argument("--num", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--remasking", default="random", choices=["random", "low-confidence"])
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    device = a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    cfg = StudentConfig(vocab_size=49152, **PRESETS[a.student])
    model = Student(cfg).to(device).eval()
    prompts = torch.randint(0, cfg.vocab_size, (a.num, a.prompt_tokens), device=device)
    x = torch.cat([prompts, torch.full((a.num, a.length), cfg.mask_id, device=device)], 1)
    kw = dict(temperature=a.temperature, remasking=a.remasking)
    denoise(model, x[:1], 2, seeds=[0], **kw)  # warm-up
    alone, t1 = timed(lambda: torch.cat([denoise(model, x[i : i + 1], a.steps, seeds=[i], **kw) for i in range(a.num)]))
    bs = a.batch_size
    batched, tb = timed(
        lambda: torch.cat(
            [
                denoise(model, x[i : i + bs], a.steps, seeds=list(range(i, i + bs))[: len(x[i : i + bs])], **kw)
                for i in range(0, a.num, bs)
            ]
        )
    )
    same = (batched == alone).float().mean().item()
    name = torch.cuda.get_device_name() if device.startswith("cuda") else f"CPU ({torch.get_num_threads()} threads)"
    print(
        f"{name}; student {a.student}, {a.num} samples of {a.length} tokens after {a.prompt_tokens}, {a.steps} steps, "
        f"{a.remasking} remasking at T = {a.temperature}"
    )
    for label, t in (("one at a time", t1), (f"batches of {bs}", tb)):
        print(f"  {label:>16}: {t:7.2f} s  {a.num / t:7.2f} samples/s  {a.num * a.length / t:8.0f} tokens/s")
    print(f"  batched / one at a time: {t1 / tb:.2f}x faster; the same tokens drawn at {same:.1%} of positions")


if __name__ == "__main__":
    main()
