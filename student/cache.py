"""A block student's KV cache: preallocated keys and values of the positions its sampler has committed.

As nanochat's ``KVCache`` and gpt-fast's, the buffers are allocated once, (layers, B, Hkv, T, D) each, and a
position that advances (`length`) says how many are held. A forward of S tokens writes its keys and values at
[length, length + S) and attends over the first length + S (`update`, a view: nothing is copied but the S new
positions); `advance(n)` then keeps the forward's first n, its clean tokens, and the next forward overwrites the
rest (the current block's noisy tokens, which no later forward reads).
"""

from __future__ import annotations

import torch


class KVCache:
    def __init__(
        self, *, num_layers: int, batch: int, num_kv_heads: int, head_dim: int, max_len: int, dtype, device
    ) -> None:
        shape = (num_layers, batch, num_kv_heads, max_len, head_dim)
        self.keys = torch.empty(shape, dtype=dtype, device=device)
        self.values = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0  # positions held: the committed ones

    @classmethod
    def for_model(cls, model, batch: int, max_len: int) -> "KVCache":
        """A cache for ``batch`` rows of up to ``max_len`` positions of `model.Student` ``model``."""
        c, w = model.config, model.model.embed_tokens.weight
        hd = c.hidden_size // c.num_heads
        return cls(
            num_layers=c.num_layers,
            batch=batch,
            num_kv_heads=c.num_kv_heads,
            head_dim=hd,
            max_len=max_len,
            dtype=w.dtype,
            device=w.device,
        )

    def repeat(self, n: int) -> "KVCache":
        """A cache of n rows, each holding this one-row cache's positions: a prefix computed once and shared by n
        continuations."""
        out = KVCache.__new__(KVCache)
        out.keys, out.values = self.keys.repeat(1, n, 1, 1, 1), self.values.repeat(1, n, 1, 1, 1)
        out.length = self.length
        return out

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a forward's keys and values k, v (B, Hkv, S, D) after the held positions; returns the layer's
        keys and values through them (B, Hkv, length + S, D), views of the buffers."""
        end = self.length + k.shape[2]
        self.keys[layer, :, :, self.length : end] = k
        self.values[layer, :, :, self.length : end] = v
        return self.keys[layer, :, :, :end], self.values[layer, :, :, :end]

    def advance(self, n: int) -> None:
        """Keep the first n positions the last forward wrote (its clean tokens)."""
        self.length += n
