"""The teacher as the particle sampler sees it: next-token logits and a KV cache that can be copied between rows.

`Decoder` is the whole contract (gpt-fast's split: the model and its cache here, the sampling in `particles`).
`TorchDecoder` answers it with a transformers causal LM and its `DynamicCache`.
"""

from __future__ import annotations

import inspect
from typing import Protocol

import torch


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Start a cache for the rows ``ids`` (N, n); return the logits after their last token (N, V) float32."""
        ...

    def repeat(self, k: int) -> None:
        """Repeat every cached row k times, in place (row r's copies at r·k .. r·k + k - 1)."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (N,); return the logits after it (N, V) float32."""
        ...

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Cache rows ``dst`` (n,) become copies of rows ``src`` (n,) (read before any is written)."""
        ...


def cache_arg(model) -> str:
    # transformers renamed `past_key_values` to `cache` (5.x); pass whichever this version's forward takes
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class TorchDecoder:
    """A transformers causal LM with a `DynamicCache`: rows are all equally long, so no padding or position ids."""

    def __init__(self, model):
        self.model = model
        self.arg = cache_arg(model)
        self.cache = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=ids, use_cache=True, **{self.arg: self.cache})
        return out.logits[:, -1].float()  # (N, V)

    def prefill(self, ids: torch.Tensor) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        return self._forward(ids)

    def repeat(self, k: int) -> None:
        self.cache.batch_repeat_interleave(k)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens[:, None])

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        # only the resampled rows move (index_copy), not the whole cache (DynamicCache.reorder_cache)
        for layer in self.cache.layers:
            layer.keys.index_copy_(0, dst, layer.keys.index_select(0, src))
            layer.values.index_copy_(0, dst, layer.values.index_select(0, src))
