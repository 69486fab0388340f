"""Mask sampling, shared by the precompute (which stores masks) and the trainer (which may resample them).

Masks follow the seed's forward process: t ~ U(eps, 1), then every maskable position is masked independently
with probability t. We force at least one masked position, since a row without any contributes no loss.
"""

from __future__ import annotations

import hashlib

import torch


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from a global seed and a row's identity, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def maskable_positions(seq_len: int, prompt_len: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions that may be masked: never 0 (BOS), never inside the prompt."""
    pos = torch.arange(seq_len, device=prompt_len.device)  # (L,)
    return pos[None, :] >= prompt_len.clamp(min=1)[:, None]  # (B, L)


def sample_masks(
    maskable: torch.Tensor, generator: torch.Generator | None = None, eps: float = 1e-3
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (t, mask) for a batch.

    Args:
        maskable: (B, L) bool, positions allowed to be masked.
        generator: CPU torch.Generator for reproducibility.
        eps: lower bound of t, so that t is never 0 (the 1/t ELBO weight stays finite).
    Returns:
        t: (B,) float32 in [eps, 1); mask: (B, L) bool, a subset of ``maskable`` with at least one True in
        every row that has a maskable position.
    """
    B, L = maskable.shape
    dev = maskable.device
    # Draw on the CPU generator, then move: results do not depend on the device.
    t = eps + (1.0 - eps) * torch.rand(B, generator=generator)  # (B,)
    u = torch.rand(B, L, generator=generator)  # (B, L)
    # Always drawn, so the random stream is the same whether or not a row needs the fallback.
    fallback = torch.rand(B, L, generator=generator)  # (B, L)
    t, u, fallback = t.to(dev), u.to(dev), fallback.to(dev)
    mask = (u < t[:, None]) & maskable  # (B, L)
    empty = ~mask.any(dim=1) & maskable.any(dim=1)  # (B,)
    if empty.any():
        # pick one maskable position uniformly: the argmax of uniform noise restricted to maskable positions
        pick = torch.where(maskable, fallback, torch.full_like(fallback, -1.0)).argmax(dim=1)  # (B,)
        mask[empty, pick[empty]] = True
    return t.float(), mask


def sample_row_mask(
    prompt_len: int, seq_len: int, seed: int, key: str, eps: float = 1e-3
) -> tuple[float, torch.Tensor]:
    """(t, mask (L,) bool) for one row, determined by ``seed`` and the row's ``key`` alone."""
    g = torch.Generator().manual_seed(row_seed(seed, key))
    maskable = maskable_positions(seq_len, torch.tensor([prompt_len]))
    t, mask = sample_masks(maskable, g, eps)
    return float(t[0]), mask[0]
