"""The teacher as the particle sampler sees it: next-token logits and a KV cache that can be copied between rows.

`Decoder` is the whole contract (gpt-fast's split: the model and its cache here, the sampling in `particles`).
`TorchDecoder` answers it with a transformers causal LM and its `DynamicCache` (the CPU's: attention reads only the
positions so far); `StaticDecoder` with a cache preallocated for the batch and the row length, so the one-token
step has fixed shapes and addresses and runs on CUDA as a CUDA graph (`torch.compile(mode="reduce-overhead")`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Protocol

import torch

from ar2mdm.precompute.forward import head_logits


@dataclass
class CleanRows:
    """The clean rows' keys and values at every position and their last hidden states (`encode`): block rows
    start their particles from a prefix of them (`Decoder.prefill_from`), so a row's prefix is computed once for
    all its blocks."""

    cache: object  # a transformers DynamicCache over (R, L)
    hidden: torch.Tensor  # (R, L, H)


def encode(model, ids: torch.Tensor) -> CleanRows:
    """One causal forward of the rows ``ids`` (R, L), keeping what every prefix of them needs."""
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model.base_model(input_ids=ids, use_cache=True, **{cache_arg(model.base_model): cache})
    return CleanRows(cache, out.last_hidden_state)


def prefix_layers(clean: CleanRows, rows: torch.Tensor, n: int, k: int):
    """Per layer (keys, values) of the clean rows ``rows`` (R,) at positions [0, n), each repeated k times."""
    return [
        (layer.keys[rows, :, :n].repeat_interleave(k, 0), layer.values[rows, :, :n].repeat_interleave(k, 0))
        for layer in clean.cache.layers
    ]


class Decoder(Protocol):
    def prefill(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        """Start a cache for the rows ``ids`` (R, n), each repeated k times (row r's copies at r·k .. r·k + k - 1);
        return the logits after their last token (R·k, V) float32."""
        ...

    def prefill_from(self, clean: CleanRows, rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
        """As `prefill` for the first n tokens of the clean rows ``rows`` (R,), read from ``clean`` instead of
        computed."""
        ...

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token per row (N,); return the logits after it (N, V) float32."""
        ...

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Cache rows ``dst`` (n,) become copies of rows ``src`` (n,) (read before any is written)."""
        ...


def cache_arg(model) -> str:
    # transformers renamed ``past_key_values`` to `cache` (5.x); pass whichever this version's forward takes
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def last_logits(model, out) -> torch.Tensor:
    """(N, V) float32 logits after the last position, from the base model's output: the head applied to the last
    hidden states only, not to every prefilled position (`forward.head_logits`)."""
    return head_logits(model, out.last_hidden_state[:, -1])


def copy_cache_rows(cache, dst: torch.Tensor, src: torch.Tensor) -> None:
    """Cache rows ``dst`` become copies of rows ``src``, in place: only the resampled rows move (not the whole cache,
    as ``Cache.reorder_cache`` would), and a static cache's buffers keep the addresses a CUDA graph recorded."""
    for layer in cache.layers:
        layer.keys.index_copy_(0, dst, layer.keys.index_select(0, src))
        layer.values.index_copy_(0, dst, layer.values.index_select(0, src))


class TorchDecoder:
    """A transformers causal LM with a `DynamicCache`: rows are all equally long, so no padding or position ids."""

    def __init__(self, model):
        self.model = model
        self.arg = cache_arg(model.base_model)
        self.cache = None

    def _forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=ids, use_cache=True, **{self.arg: self.cache})
        return last_logits(self.model, out)  # (N, V)

    def prefill(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        last = self._forward(ids)  # the prefix once per row, then its cache shared by the row's k particles
        self.cache.batch_repeat_interleave(k)
        return last.repeat_interleave(k, 0)

    def prefill_from(self, clean: CleanRows, rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
        from transformers import DynamicCache

        self.cache = DynamicCache()
        for j, (keys, values) in enumerate(prefix_layers(clean, rows, n, k)):
            self.cache.update(keys, values, j)
        return head_logits(self.model, clean.hidden[rows, n - 1]).repeat_interleave(k, 0)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._forward(tokens[:, None])

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        copy_cache_rows(self.cache, dst, src)


class StaticDecoder:
    """A transformers causal LM with a `StaticCache` of the batch's rows and length L.

    Every decode step has the same shapes and reads and writes the same buffers (the resampled rows are copied
    in place), which is what lets CUDA replay it as a graph: one launch per step instead of one per kernel. One
    decoder serves every batch of a build: the cache is allocated for the first batch of each size and zeroed for
    the next, so the step is compiled once per batch size, not once per batch. The price is attention over all L
    cached positions (masked) instead of the j so far, so the CPU keeps `TorchDecoder`. The prefix is prefilled
    for each of a row's k copies (k·p0 tokens instead of p0, small)."""

    def __init__(self, model, length: int, graph: bool):
        self.model = model
        self.arg = cache_arg(model.base_model)
        self.length = length
        self.graph = graph
        self.cache = None
        self.rows = 0  # the rows the cache holds
        self.pos = None  # (1,) long: the next position, on the model's device
        self._decode = None  # the compiled step (graph)

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(input_ids=tokens, cache_position=pos, use_cache=True, **{self.arg: self.cache})
        return last_logits(self.model, out)

    def _start(self, rows: int, n: int, device) -> None:
        """A zeroed cache for ``rows`` rows, the next position n."""
        from transformers import StaticCache

        if self.cache is None or self.rows != rows:
            self.cache = StaticCache(config=self.model.config, max_cache_len=self.length)
            self.rows = rows
        else:
            self.cache.reset()  # the same buffers, zeroed: the compiled step's addresses stay valid
        self.pos = torch.tensor([n], device=device)
        if self.graph and self._decode is None:  # a new batch size recompiles (a build's batches share one)
            self._decode = torch.compile(self._step, mode="reduce-overhead", dynamic=False)

    def prefill(self, ids: torch.Tensor, k: int) -> torch.Tensor:
        ids = ids.repeat_interleave(k, 0)
        n = ids.shape[1]
        self._start(ids.shape[0], n, ids.device)
        pos = torch.arange(n, device=ids.device)
        out = self.model.base_model(input_ids=ids, cache_position=pos, use_cache=True, **{self.arg: self.cache})
        return last_logits(self.model, out)

    def prefill_from(self, clean: CleanRows, rows: torch.Tensor, n: int, k: int) -> torch.Tensor:
        self._start(len(rows) * k, n, rows.device)
        for j, (keys, values) in enumerate(prefix_layers(clean, rows, n, k)):
            self.cache.update(keys, values, j)  # written into the static buffers at [0, n)
        return head_logits(self.model, clean.hidden[rows, n - 1]).repeat_interleave(k, 0)

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        tokens = tokens[:, None].contiguous()
        if self.graph:
            try:
                last = self._decode(tokens, self.pos).clone()  # a graph's output is overwritten by the next replay
            except Exception as e:  # a model or torch version that does not compile: eager, and say so once
                import sys

                print(
                    f"kdtargets: the decode step does not compile ({type(e).__name__}); running eager", file=sys.stderr
                )
                self.graph = False
                last = self._step(tokens, self.pos)
        else:
            last = self._step(tokens, self.pos)
        self.pos += 1
        return last

    def copy_rows(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        copy_cache_rows(self.cache, dst, src)


def decoder_for(model, length: int):
    """The decoder a device runs best for rows of ``length``: a static cache and CUDA graphs on CUDA, the dynamic
    cache elsewhere. Keep it for the next batches (`TorchTeacher` does): a static decoder reuses its cache."""
    if next(model.parameters()).is_cuda:
        return StaticDecoder(model, length, graph=True)
    return TorchDecoder(model)
