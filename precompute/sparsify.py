"""Sampled sparse targets (RS-KD: Anshumann et al., ACL 2025, "Sparse Logit Sampling"), beside top-N.

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
