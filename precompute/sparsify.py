"""What a target keeps of the distribution a mode computed: its top-N entries (`select_top_n`, the default) or
sampled ones (RS-KD: Anshumann et al., ACL 2025, "Sparse Logit Sampling"; `sample_sparse`).

Top-N keeps the N most probable tokens: the stored target is biased (everything below rank N is gone, and a
student trained on it renormalised is over-confident on the head). ``--sparsify sample`` instead draws S tokens
i.i.d. from the target q restricted to the support the mode computed (its mass m <= 1) and stores each distinct
token v with

    q̂(v) = m · count(v) / S,     E[q̂(v)] = q(v)  for every v in the support,

so the stored target is an unbiased estimate of q (sums to m exactly, like the top-N ones sum to their mass),
and the KD gradient −Σ_v q̂(v) ∇ log p_θ(v) is unbiased for the dense one at T = 1. It costs at most S entries
per position, fewer when q is peaked (repeated draws share one entry).
"""

from __future__ import annotations

import numpy as np
import torch

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.shared.masking import row_seed


def sample_sparse(
    ids: torch.Tensor, logq: torch.Tensor, samples: int, generator: torch.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """S draws from the (sub-)distribution exp(logq) over ``ids`` (C,) -> (distinct ids, log q̂), most drawn first.

    Entries with logq = -inf are never drawn; q̂(v) = m · count(v)/S with m = Σ exp(logq).
    """
    q = logq.double().exp().cpu()  # (C,)
    m = min(float(q.sum()), 1.0)  # (a normalised q can sum to 1 + 1e-7 in float32)
    if m <= 0:
        return np.zeros(0, np.int32), np.zeros(0, np.float32)
    draws = torch.multinomial((q / m).float(), samples, replacement=True, generator=generator)  # (S,)
    uniq, counts = torch.unique(draws, return_counts=True)
    order = torch.argsort(counts, descending=True, stable=True)
    uniq, counts = uniq[order], counts[order]
    lp = torch.log(counts.double() * (m / samples))
    return ids.cpu()[uniq].numpy().astype(np.int32), lp.numpy().astype(np.float32)


def select_top_n(cand: torch.Tensor, logq: torch.Tensor, top_n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per position, the up-to-``top_n`` most probable valid entries (logq > -inf), most probable first.

    cand, logq: (P, C). Returns lists of P arrays (ids int32, logprobs float32).
    """
    order = torch.argsort(logq, dim=1, descending=True, stable=True)[:, :top_n]  # (P, n)
    lq = logq.gather(1, order)
    ids = cand.gather(1, order)
    keep = torch.isfinite(lq)
    ids_out, lq_out = [], []
    for p in range(cand.shape[0]):
        ids_out.append(ids[p][keep[p]].numpy().astype(np.int32))
        lq_out.append(lq[p][keep[p]].numpy().astype(np.float32))
    return ids_out, lq_out


def sparse_targets(cfg: BuildConfig, cand: torch.Tensor, logq: torch.Tensor, key: str):
    """Per position of (cand, logq) (P, C): the stored entries, top-N or (``--sparsify sample``) RS-KD draws
    seeded by ``key`` (a sequence or row id), so a resumed build draws the same."""
    if cfg.sparsify == "topn":
        return select_top_n(cand, logq, cfg.top_n)
    g = torch.Generator().manual_seed(row_seed(cfg.seed, key + ":sample"))
    out = [sample_sparse(cand[p], logq[p], cfg.draws, g) for p in range(cand.shape[0])]
    return [i for i, _ in out], [lp for _, lp in out]


def support_size(cfg: BuildConfig) -> int:
    """Entries a mode hands over per position: top_n, or a wider support to sample from."""
    from ar2mdm.precompute.mc.particles import next_token_keep

    return cfg.top_n if cfg.sparsify == "topn" else next_token_keep(cfg.top_n)
