"""The student: Llama-style blocks (RoPE, RMSNorm, SwiGLU), bidirectional over the row or over blocks of it.

Parameter names follow transformers' Llama/Qwen2 layout (``model.layers.N.self_attn.q_proj`` ...), so that
`--init-from` copies an AR checkpoint key by key and only the attention mask changes (as Dream and DiffuLLaMA
adapt AR models). The input embedding has one more row than the teacher's vocabulary: the mask token; the output
head predicts only the teacher's vocabulary.

Two attention layouts (docs/design.md §6):

- ``block_size`` None: every position attends to every other (a full-attention MDM student);
- ``block_size`` B: a block student. Training and scoring see the noisy row and the clean row side by side (2L
  tokens, positions 0..L-1 twice; BD3-LM's layout, `block_attention_mask`): a noisy token of block b attends to
  the noisy tokens of its own block (both ways) and to the clean tokens of blocks < b; a clean token of block b
  to the clean tokens of blocks <= b. Sampling feeds the current block alone against a `KVCache` of the clean
  blocks before it (`Student.cached_hidden`), which computes the same attention.

This file imports nothing of ar2mdm: `kdtrain export` ships it as it is, beside the samplers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


class StudentConfigError(ValueError):
    """A student configuration that cannot be built."""


@dataclass
class StudentConfig:
    vocab_size: int  # the teacher's vocabulary; the mask token id is vocab_size
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 768
    max_positions: int = 2048
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    attention_bias: bool = False  # q/k/v biases (Qwen2; Llama's attention_bias also sets o_bias)
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = True
    # RoPE scaling as transformers writes it ({"rope_type": "llama3", "factor": ..., ...}); None: plain RoPE
    rope_scaling: dict | None = None
    # the AR shift (Dream, DiffuLLaMA, Fast-dLLM v2): x_i is predicted from the hidden state at i-1, as the AR head
    # was trained to; on by default for --init-from, so the copied head is used for what it learnt
    shift: bool = False
    # tokens per block of a block student (causal across blocks, bidirectional inside one); None: full attention
    block_size: int | None = None

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def check(self) -> None:
        """Raise StudentConfigError on fields no student can be built from."""
        if self.vocab_size < 2:
            raise StudentConfigError(f"student vocab_size {self.vocab_size} is too small")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise StudentConfigError(
                f"student config: hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"and num_heads by num_kv_heads {self.num_kv_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise StudentConfigError("student config: head dimension must be even for RoPE")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise StudentConfigError(
                f"student config: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )
        if self.block_size is not None and self.block_size < 1:
            raise StudentConfigError(f"student config: block_size {self.block_size} must be at least 1")

    def to_dict(self) -> dict:
        return asdict(self)


ROPE_TYPES = ("default", "linear", "llama3")


def rope_inv_freq(dim: int, theta: float, scaling: dict | None) -> torch.Tensor:
    """(dim/2,) RoPE inverse frequencies, with transformers' "linear" and "llama3" scaling (Llama 3.1+)."""
    inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    kind = (scaling or {}).get("rope_type", "default")
    if kind == "linear":
        return inv / float(scaling["factor"])
    if kind == "llama3":
        factor, lo, hi = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
        old = float(scaling["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > old / lo, inv / factor, inv)  # long wavelengths are slowed down
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = (wavelen >= old / hi) & (wavelen <= old / lo)  # between: interpolate
        return torch.where(medium, (1 - smooth) * scaled / factor + smooth * scaled, scaled)
    return inv


def rope_cos_sin(pos: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(L, D) cos and sin tables for positions pos (L,) (rotate-half layout, as transformers' Llama)."""
    ang = pos.float()[:, None] * inv_freq.to(pos.device)[None]  # (L, D/2)
    ang = torch.cat([ang, ang], -1)  # (L, D)
    return ang.cos().to(dtype), ang.sin().to(dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding. x: (B, H, L, D), cos/sin: (L, D)."""
    D = x.shape[-1]
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        var = x.float().pow(2).mean(-1, keepdim=True)
        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight


class Attention(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.c = c
        hd = c.hidden_size // c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * hd, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * hd, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * hd, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: "LayerCache | None" = None):
        """x: (B, L, hidden); mask: None (every position attends to every other) or (L, n + L) bool, True where
        a query attends, n the positions in ``cache`` (which it extends, `LayerCache.extend`)."""
        B, L, _ = x.shape
        c, hd = self.c, self.c.hidden_size // self.c.num_heads
        q = self.q_proj(x).view(B, L, c.num_heads, hd).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, c.num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, c.num_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.extend(k, v)  # (B, Hkv, n + L, D)
        rep = c.num_heads // c.num_kv_heads
        # grouped-query heads go to the flash kernel as they are (enable_gqa), not copied rep times; only flash
        # reads them so (CUDA, half precision, no mask: pre-Ampere GPUs lack it too), and every other kernel would
        # take enable_gqa to the unfused math kernel, slower than copying (pytorch#181528), so the rest copy
        gqa = rep > 1 and mask is None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if rep > 1 and not gqa:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.up_proj = nn.Linear(c.hidden_size, c.intermediate_size, bias=c.mlp_bias)
        self.down_proj = nn.Linear(c.intermediate_size, c.hidden_size, bias=c.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size + 1, c.hidden_size)  # + the mask token
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)


def block_attention_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool, True where a query attends, for the noisy row (first L) beside the clean row (last L).

    With b(i) = i // B in either half: a noisy query of block b sees the noisy keys of block b and the clean keys of
    blocks < b; a clean query of block b sees the clean keys of blocks <= b. Never a noisy key from the clean half.
    """
    blk = torch.arange(seq_len, device=device) // block_size  # (L,)
    q, k = blk[:, None], blk[None, :]  # (L, 1), (1, L)
    noisy = torch.cat([q == k, q > k], dim=1)  # (L, 2L)
    clean = torch.cat([torch.zeros(seq_len, seq_len, dtype=torch.bool, device=device), q >= k], dim=1)
    return torch.cat([noisy, clean], dim=0)


class LayerCache:
    """One layer's keys and values of the committed (clean) positions, (B, Hkv, n, D) each."""

    def __init__(self):
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None
        self.write = 0  # the leading tokens of the next forward whose keys and values are kept

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the cached keys, then k), likewise for values; keeps the first ``write`` of the new ones."""
        if self.keys is not None:
            k, v = torch.cat([self.keys, k], dim=2), torch.cat([self.values, v], dim=2)
        n = 0 if self.keys is None else self.keys.shape[2]
        self.keys, self.values = k[:, :, : n + self.write], v[:, :, : n + self.write]
        return k, v


class KVCache:
    """The clean positions' keys and values, one `LayerCache` per layer (nanochat's KVCache): what a block
    student's sampler has committed so far."""

    def __init__(self, num_layers: int):
        self.layers = [LayerCache() for _ in range(num_layers)]
        self.length = 0  # positions held

    def keep(self, n: int) -> None:
        """The next forward's first n tokens are clean positions to keep."""
        for layer in self.layers:
            layer.write = n
        self.length += n


class Student(nn.Module):
    """p_θ(x_0,i | x_t) for every position at once."""

    def __init__(self, c: StudentConfig):
        super().__init__()
        self.config = c
        self.model = Backbone(c)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)
        self.apply(self._init)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    def _layers(self, ids: torch.Tensor, pos: torch.Tensor, mask=None, cache: KVCache | None = None) -> torch.Tensor:
        """(B, S) ids at positions pos (S,) -> (B, S, H) final hidden states."""
        c = self.config
        h = self.model.embed_tokens(ids)
        cos, sin = rope_cos_sin(pos, rope_inv_freq(c.hidden_size // c.num_heads, c.rope_theta, c.rope_scaling), h.dtype)
        for j, layer in enumerate(self.model.layers):
            h = layer(h, cos, sin, mask, None if cache is None else cache.layers[j])
        return self.model.norm(h)

    def hidden(self, x_t: torch.Tensor, clean: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, H): the hidden state each position of x_t is predicted from (mask token = vocab_size).

        With the AR shift it is the state at i-1: in a block student, for a block's first position, the clean
        copy's (the previous block as committed, which is what the sampler reads too). A block student needs
        ``clean`` (B, L), the clean row; a full-attention student ignores it."""
        c = self.config
        L = x_t.shape[1]
        pos = torch.arange(L, device=x_t.device)
        if c.block_size is None:
            h = self._layers(x_t, pos)  # (B, L, H)
            return torch.cat([h[:, :1], h[:, :-1]], dim=1) if c.shift else h
        if clean is None:
            raise ValueError("a block student reads the clean row beside the noisy one: pass clean=")
        mask = block_attention_mask(L, c.block_size, x_t.device)  # (2L, 2L)
        h = self._layers(torch.cat([x_t, clean], dim=1), torch.cat([pos, pos]), mask)  # (B, 2L, H)
        noisy, clean_h = h[:, :L], h[:, L:]
        if not c.shift:
            return noisy
        prev = torch.cat([noisy[:, :1], noisy[:, :-1]], dim=1)  # (B, L, H): h_{i-1} of the noisy copy
        starts = (pos % c.block_size == 0) & (pos > 0)  # (L,) a block's first position reads the clean copy
        prev_clean = torch.cat([clean_h[:, :1], clean_h[:, :-1]], dim=1)
        return torch.where(starts[None, :, None], prev_clean, prev)

    def cached_hidden(
        self, ids: torch.Tensor, cache: KVCache, *, commit: int, last_clean: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A block student's forward against its cache: ``ids`` (B, S) hold ``commit`` clean tokens (whole blocks,
        kept in ``cache``) and then the current block, at the positions that follow the cache's.

        Returns the hidden states the current block's positions are predicted from (B, S - commit, H), as
        `hidden` computes them, and the last clean position's own state (B, H), which predicts the next block's
        first position under the AR shift (``last_clean``: that state from an earlier forward, where this one
        commits nothing)."""
        c = self.config
        S, n = ids.shape[1], cache.length
        pos = torch.arange(n, n + S, device=ids.device)
        blk = pos // c.block_size
        q, k = blk[:, None], blk[None, :]
        # the clean tokens see the clean blocks up to their own; the current block sees itself and every clean one
        fresh = (q >= k) & ((q == k) | (torch.arange(S, device=ids.device)[None, :] < commit))  # (S, S)
        mask = torch.cat([torch.ones(S, n, dtype=torch.bool, device=ids.device), fresh], dim=1)  # (S, n + S)
        cache.keep(commit)
        h = self._layers(ids, pos, mask, cache)  # (B, S, H)
        if commit:
            last_clean = h[:, commit - 1]
        block = h[:, commit:]
        if c.shift and last_clean is not None:
            block = torch.cat([last_clean[:, None], block[:, :-1]], dim=1)
        elif c.shift:  # the row's first block: position 0 (BOS) is never predicted
            block = torch.cat([block[:, :1], block[:, :-1]], dim=1)
        return block, last_clean

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V): the head covers the teacher's vocabulary only, never the mask token."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return h @ self.model.embed_tokens.weight[: self.config.vocab_size].T

    def forward(
        self, x_t: torch.Tensor, select: torch.Tensor | None = None, clean: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, L, V), or (M, V) at the M selected positions: ``select`` is a (B, L) bool mask, or the (M,)
        flat indices b·L + i (the training step's, which need no host sync to gather). ``clean``: the clean row,
        which a block student reads (`hidden`).

        Selecting before the head keeps the V-sized work proportional to the masked positions. With the AR
        shift, position i reads the hidden state of i-1 (position 0, BOS, is never predicted).
        """
        h = self.hidden(x_t, clean)  # (B, L, H)
        if select is None:
            return self.logits(h)
        if select.dtype == torch.bool:
            return self.logits(h[select])
        return self.logits(h.flatten(0, 1).index_select(0, select))  # (M, H) -> (M, V)
