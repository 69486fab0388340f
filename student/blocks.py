"""The rules of blocks, written once (docs/design.md §6): which block a position is in, who attends to whom, and
which state a position is predicted from under the AR shift.

A row of L tokens is cut into blocks of B; without a block size the row is one block (a full-attention student).
The training layout puts the noisy row beside the clean one (BD3-LM); the sampler's cached forward puts the clean
positions it commits beside the current noisy block. Both build their attention mask from `attends`.
"""

from __future__ import annotations

import torch


def block_of(pos, block_size: int | None):
    """The block that holds position ``pos`` (an int or a tensor of them): pos // B; 0 without blocks."""
    return pos // block_size if block_size else pos * 0


def attends(q_block, q_clean, k_block, k_clean):
    """The block-causal rule, True where a query attends to a key (broadcasting tensors of block indices and
    whether each token is clean): a noisy token sees the noisy tokens of its own block and the clean tokens of
    earlier blocks; a clean token sees the clean tokens of its own block and earlier ones. A noisy key is never
    seen from another block, nor by a clean query."""
    return (k_clean & (k_block < q_block)) | ((q_clean == k_clean) & (k_block == q_block))


def shift_source(pos: torch.Tensor, block_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The AR shift for positions ``pos`` (S,): the position each is predicted from (i - 1; position 0, BOS,
    never predicted, its own) and whether that state is the clean one (S,) bool: a block's first position reads
    the block before it as committed, every other position its noisy neighbour. Without blocks, never clean."""
    src = (pos - 1).clamp(min=0)
    return src, block_of(src, block_size) != block_of(pos, block_size)
