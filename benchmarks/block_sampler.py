"""A block student's sampler against its teacher's own KV-cached AR decoding: tokens/s of each and their ratio,
measured in the same run on the same machine, the same held-out prompts and length, at batch 1 and 16; and the
sampler on its preallocated `cache.KVCache` against the same sampler on a cache that concatenates the held keys and
values with each forward's (`ConcatCache`: a copy of the whole cache per forward).

    python -m benchmarks.block_sampler --run RUN [--threshold 0.9] [--batches 1,16] [--length 48] [--prompts 16]
    python -m benchmarks.block_sampler --student base --block-size 4 --per-forward 2   # a random student's shape

The student is a trained run (an A2D block student has the teacher's shape), or a random one of a preset's shape
(throughput does not depend on the weights' values; the tokens it reveals per forward do, so give --per-forward).
The teacher is the default one, drawing token by token on its KV cache (`kdtargets sample`'s decoder: a static
cache and a CUDA graph on a GPU). Both draw at temperature 1 with no stop token, so every row is --length tokens.
Printed: the device, tokens/s and forwards of each, the student's tokens per forward, and the ratios. Both caches
draw the same samples (the same forwards): only the time differs.
"""

from __future__ import annotations

import argparse
import time

import torch


class ConcatCache:
    """The baseline cache: `KVCache`'s interface, each forward's keys and values concatenated after the held ones
    (a new tensor per layer per forward, whatever it keeps)."""

    def __init__(self, num_layers: int):
        self.keys: list = [None] * num_layers
        self.values: list = [None] * num_layers
        self.length = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys[layer] is not None:
            k, v = torch.cat([self.keys[layer], k], dim=2), torch.cat([self.values[layer], v], dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v

    def advance(self, n: int) -> None:
        self.length += n
        self.keys = [k[:, :, : self.length] for k in self.keys]
        self.values = [v[:, :, : self.length] for v in self.values]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", help="a block student's kdtrain run")
    ap.add_argument("--student", default="base", help="without --run: a random student of this preset")
    ap.add_argument("--block-size", type=int, default=4, help="without --run: its block size")
    ap.add_argument("--threshold", type=float, default=0.9)
    ap.add_argument("--per-forward", type=int, default=None)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=15)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args()

    from ar2mdm.precompute.decode import decoder_for
    from ar2mdm.precompute.sample import ar_sample
    from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
    from ar2mdm.shared.defaults import default_corpus
    from ar2mdm.shared.sampling import corpus_prompts
    from ar2mdm.student.block_sampler import block_generate
    from ar2mdm.student.model import Student
    from ar2mdm.train.checkpoint import load_student
    from ar2mdm.train.presets import student_config

    folder, _ = resolve_teacher(None)
    tok = load_tokenizer(folder)
    teacher = TorchTeacher.load(folder, a.device, "float32" if a.device == "cpu" else "auto")
    if a.run:
        student, _ = load_student(a.run, a.device)
    else:
        cfg = student_config(a.student, teacher.model.config.vocab_size, 2048, shift=True, block_size=a.block_size)
        student = Student(cfg).to(a.device).eval()
    if student.config.block_size is None:
        raise SystemExit(f"{a.run}: a full-attention student; this compares block students")
    kw = dict(prompt_tokens=a.prompt_tokens, length=a.length, num=a.prompts, split="test")
    prompts = torch.tensor([p.ids for p in corpus_prompts(default_corpus("comedies"), tok, **kw)], device=a.device)
    L = prompts.shape[1] + a.length
    decoder = decoder_for(teacher.model, L)
    sync = torch.cuda.synchronize if a.device.startswith("cuda") else (lambda: None)

    def student_batch(x, seeds, cache=None):
        return block_generate(
            student,
            x,
            a.length,
            threshold=a.threshold,
            per_forward=a.per_forward,
            temperature=1.0,
            seeds=seeds,
            cache=cache,
        )[1]

    def concat_batch(x, seeds):
        return student_batch(x, seeds, ConcatCache(student.config.num_layers))

    def teacher_batch(x, seeds):
        ar_sample(decoder, x, a.length, temperature=1.0, seeds=seeds, stops=[])
        return torch.full((len(x),), a.length)  # a forward a token, the prefill's included

    name = torch.cuda.get_device_name() if a.device.startswith("cuda") else f"CPU, {torch.get_num_threads()} threads"
    print(f"{name}; {a.prompts} held-out prompts of {prompts.shape[1]} tokens, {a.length} tokens each")
    print(f"student: {a.run or a.student} (block {student.config.block_size}), threshold {a.threshold}, "
          f"per forward {a.per_forward}")  # fmt: skip
    for bs in [int(b) for b in a.batches.split(",")]:
        times, forwards = {}, {}
        for who, fn in (("teacher", teacher_batch), ("student", student_batch), ("concat", concat_batch)):
            fn(prompts[:bs], list(range(bs)))  # warm-up: a CUDA graph or compile, caches
            sync()
            t0 = time.perf_counter()
            f = 0
            for s in range(0, len(prompts), bs):
                f += int(fn(prompts[s : s + bs], list(range(s, s + bs))).sum())
            sync()
            times[who], forwards[who] = time.perf_counter() - t0, f
        tokens = len(prompts) * a.length
        t, s, c = (tokens / times[w] for w in ("teacher", "student", "concat"))
        print(
            f"batch {bs:>3}: teacher {t:8.1f} tokens/s ({forwards['teacher'] / len(prompts):.1f} forwards a sample), "
            f"student {s:8.1f} tokens/s ({tokens / forwards['student']:.2f} tokens per forward): {s / t:.2f}x; "
            f"on the concatenating cache {c:8.1f} tokens/s: preallocated {s / c:.2f}x"
        )


if __name__ == "__main__":
    main()
