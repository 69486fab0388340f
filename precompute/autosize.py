"""What `--batch-size auto` and `--token-budget auto` become: the defaults on the CPU, what fits in the device's
free memory on CUDA."""

from __future__ import annotations

import dataclasses

import torch

from ar2mdm.precompute.config import CUDA_TOKEN_BUDGET, DEFAULT_BATCH, DEFAULT_TOKEN_BUDGET, BuildConfig
from ar2mdm.precompute.forward import text_config
from ar2mdm.precompute.sparsify import support_size


def auto_batch_size(cfg: BuildConfig, teacher) -> tuple[int, str]:
    """--batch-size auto (sequences), and why: 8, or for mc on CUDA the most whose rows' particles fit
    in 80% of the free GPU memory (`particles.bytes_per_row`), at most a shard's sequences."""
    if cfg.mode != "mc" or not str(teacher.device).startswith("cuda"):
        return DEFAULT_BATCH, "the default"
    from ar2mdm.precompute.mc.particles import bytes_per_row, next_token_keep

    free, _ = torch.cuda.mem_get_info()
    model = teacher.model
    elt = next(model.parameters()).element_size()
    per_row = bytes_per_row(model.config, cfg.seq_len, cfg.k, next_token_keep(support_size(cfg)), elt)
    seqs = max(1, min(cfg.seqs_per_shard, int(0.8 * free) // (per_row * cfg.masks_per_seq)))
    return seqs, f"auto: {per_row / 2**20:.0f} MiB per row, {free / 2**30:.1f} GiB free"


def auto_token_budget(cfg: BuildConfig, teacher) -> tuple[int, str]:
    """--token-budget auto, and why: 4096, or on CUDA 65536 where half the free memory holds a forward
    of that many tokens (each: the layer's activations and its row of the 1,024-token tree mask)."""
    if not str(teacher.device).startswith("cuda"):
        return DEFAULT_TOKEN_BUDGET, "the default"
    free, _ = torch.cuda.mem_get_info()
    c = text_config(teacher.model.config)
    elt = next(teacher.model.parameters()).element_size()
    per_token = (4 * c.hidden_size + 3 * c.intermediate_size) * elt + 2 * 1024
    budget = max(DEFAULT_TOKEN_BUDGET, min(CUDA_TOKEN_BUDGET, int(0.5 * free) // per_token))
    return budget, f"auto: {free / 2**30:.1f} GiB free"


def resolve_auto(cfg: BuildConfig, teacher) -> tuple[BuildConfig, list[str]]:
    """``cfg`` with --batch-size and --token-budget chosen for this teacher where they are auto, and a line for each
    choice that is not the plain default."""
    said = []
    for name, choose in (("batch_size", auto_batch_size), ("token_budget", auto_token_budget)):
        if getattr(cfg, name) == "auto":  # (vLLM's device is "vllm": the defaults, which it does not use)
            n, why = choose(cfg, teacher)
            cfg = dataclasses.replace(cfg, **{name: n})
            if why != "the default":
                said.append(f"--{name.replace('_', '-')} {n} ({why})")
    return cfg, said
