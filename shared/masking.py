"""Mask sampling, shared by the precompute (which stores masks) and the trainer (which may resample them).

Masks follow the forward process of docs/design.md §1: t ~ U(eps, 1), then every maskable position is masked
independently with probability t; rows cut into blocks (§6) draw one t per block. We force at least one masked
position per row, since a row without any contributes no loss.
"""

from __future__ import annotations

import hashlib

import torch

from ar2mdm.shared.blocks import num_blocks
from ar2mdm.student.blocks import block_of


def row_seed(seed: int, key: str) -> int:
    """A 63-bit seed derived from a global seed and a row's identity, stable across runs and machines."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def maskable_positions(seq_len: int, prompt_len: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: positions that may be masked: never 0 (BOS), never inside the prompt."""
    pos = torch.arange(seq_len, device=prompt_len.device)  # (L,)
    return pos[None, :] >= prompt_len.clamp(min=1)[:, None]  # (B, L)


def sample_masks(
    maskable: torch.Tensor,
    generator: torch.Generator | None = None,
    eps: float = 1e-3,
    block_size: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample (t, mask) for a batch: one t per block (per row without blocks), each position masked with its
    block's t.

    Args:
        maskable: (B, L) bool, positions allowed to be masked.
        generator: CPU torch.Generator for reproducibility.
        eps: lower bound of t, so that t is never 0 (the 1/t ELBO weight stays finite).
        block_size: positions per block (L must divide by it); None: the row is one block.
    Returns:
        t: (B, nb) float32 in [eps, 1), nb = L / block_size (1 without blocks); mask: (B, L) bool, a subset of
        ``maskable`` with at least one True in every row that has a maskable position.
    """
    B, L = maskable.shape
    dev = maskable.device
    # Draw on the CPU generator, then move: results do not depend on the device.
    t = eps + (1.0 - eps) * torch.rand(B, num_blocks(L, block_size), generator=generator)  # (B, nb)
    u = torch.rand(B, L, generator=generator)  # (B, L)
    # Always drawn, so the random stream is the same whether or not a row needs the fallback.
    fallback = torch.rand(B, L, generator=generator)  # (B, L)
    t, u, fallback = t.to(dev), u.to(dev), fallback.to(dev)
    mask = (u < t[:, block_of(torch.arange(L, device=dev), block_size)]) & maskable  # (B, L): each its block's t
    empty = ~mask.any(dim=1) & maskable.any(dim=1)  # (B,)
    if empty.any():
        # pick one maskable position uniformly: the argmax of uniform noise restricted to maskable positions
        pick = torch.where(maskable, fallback, torch.full_like(fallback, -1.0)).argmax(dim=1)  # (B,)
        mask[empty, pick[empty]] = True
    return t.float(), mask


def sample_row_mask(
    prompt_len: int, seq_len: int, seed: int, key: str, *, eps: float = 1e-3, block_size: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(t (nb,) one per block, mask (L,) bool) for one row, determined by ``seed`` and the row's ``key`` alone."""
    g = torch.Generator().manual_seed(row_seed(seed, key))
    maskable = maskable_positions(seq_len, torch.tensor([prompt_len]))
    t, mask = sample_masks(maskable, g, eps, block_size)
    return t[0], mask[0]


def stratified_counts(n: torch.Tensor, draws: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, draws) numbers of positions to mask, l in 1..n_b, stratified over ``draws`` equal strata of U{1..n}.

    l = 1 + floor(n · (j + u) / draws) for stratum j and one uniform u per row: a draw picked at random is
    uniform on 1..n (so the mean over the draws is unbiased), and together they cover the range evenly, which
    lowers the variance against independent draws.
    n: (B,) long, the maskable positions of each row (rows with n = 0 get l = 0).
    """
    u = torch.rand(n.shape[0], 1, generator=generator)  # (B, 1)
    j = torch.arange(draws, dtype=torch.float32)[None]  # (1, draws)
    frac = (j + u) / draws  # (B, draws) in [0, 1)
    return torch.where(
        n[:, None] > 0, 1 + torch.floor(frac * n[:, None]).long(), torch.zeros_like(frac, dtype=torch.long)
    )


def sample_count_masks(
    maskable: torch.Tensor, count: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """(B, L) bool: exactly count_b positions of each row, uniformly among its maskable ones.

    maskable: (B, L) bool; count: (B,) long, at most the row's maskable count.
    """
    noise = torch.rand(maskable.shape, generator=generator).to(maskable.device)  # (B, L)
    noise = noise.masked_fill(~maskable, 2.0)  # non-maskable positions rank last
    rank = noise.argsort(dim=1).argsort(dim=1)  # (B, L) rank of each position in its row
    return rank < count.to(maskable.device)[:, None]
