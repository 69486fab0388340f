"""How ar2mdm's torch work degrades when another job shares the CPUs, and which thread settings degrade best.

    python -m benchmarks.busy_machine [--seconds 20]

Two workloads stand for the two stages: `train` (forward + backward of a 4-layer, 576-wide Llama on 8 x 64
tokens, an A2D step in small) and `decode` (one-token forwards of the same model for 32 rows, an mc build's
inner loop). Each runs alone, then beside a competitor (another process multiplying 512x512 matrices with as many
threads as there are CPUs, like a second torch job with default threads), under each setting: threads = CPUs or
1, OMP_WAIT_POLICY unset or PASSIVE. Prints steps/s and the slowdown against the same workload alone with the
default threads, measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

WORK = r"""
import json, sys, time, torch
from transformers import LlamaConfig, LlamaForCausalLM
torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=4096, hidden_size=576, intermediate_size=1536, num_hidden_layers=4,
                  num_attention_heads=9, num_key_value_heads=3)
model = LlamaForCausalLM(cfg)
kind, seconds = sys.argv[1], float(sys.argv[2])
x = torch.randint(0, 4096, (8, 64)) if kind == "train" else torch.randint(0, 4096, (32, 1))
def step():
    if kind == "train":
        model(x, labels=x).loss.backward()
    else:
        with torch.no_grad():
            model(x)
step()
n, t0 = 0, time.perf_counter()
while time.perf_counter() - t0 < seconds:
    step(); n += 1
print(json.dumps({"steps_per_s": n / (time.perf_counter() - t0), "threads": torch.get_num_threads()}))
"""

BUSY = r"""
import torch, time
a = torch.randn(512, 512)
while True:
    a = torch.tanh(a @ a)
"""


def run(kind: str, seconds: float, env: dict) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORK, kind, str(seconds)], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["steps_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=20.0)
    a = ap.parse_args()
    cpus = len(os.sched_getaffinity(0))
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY")}
    settings = {
        f"{cpus} threads": {},
        f"{cpus} threads, OMP_WAIT_POLICY=PASSIVE": {"OMP_WAIT_POLICY": "PASSIVE"},
        "1 thread": {"OMP_NUM_THREADS": "1"},
        "1 thread, OMP_WAIT_POLICY=PASSIVE": {"OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"},
    }
    print(f"{cpus} CPUs; {a.seconds:.0f} s per measurement; slowdown against the workload alone with {cpus} threads")
    for kind in ("train", "decode"):
        alone = run(kind, a.seconds, base)
        print(f"{kind}: alone, {cpus} threads: {alone:.2f} steps/s")
        for busy in (False, True):
            comp = subprocess.Popen([sys.executable, "-c", BUSY], env=base) if busy else None
            try:
                time.sleep(2.0 if busy else 0.0)
                for name, extra in settings.items():
                    if not busy and not extra:
                        continue  # that is the baseline above
                    r = run(kind, a.seconds, {**base, **extra})
                    where = "beside a busy job" if busy else "alone"
                    print(f"  {where:18s} {name:38s} {r:7.2f} steps/s  {alone / r:5.2f}x slower", flush=True)
            finally:
                if comp:
                    comp.kill()
                    comp.wait()


if __name__ == "__main__":
    main()
