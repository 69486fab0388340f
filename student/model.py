"""The student: Llama-style decoder layers (RoPE, RMSNorm, SwiGLU), bidirectional over the row or over blocks of it.

Parameter names follow transformers' Llama/Qwen2 layout (``model.layers.N.self_attn.q_proj`` ...), so that
`--init-from` copies an AR checkpoint key by key and only the attention mask changes (as Dream and DiffuLLaMA
adapt AR models). The input embedding has one more row than the teacher's vocabulary: the mask token; the output
head predicts only the teacher's vocabulary.

Two attention layouts (docs/design.md §6; the rules in `blocks`):

- ``block_size`` None: every position attends to every other (a full-attention MDM student);
- ``block_size`` B: a block student. Training and scoring see the noisy row and the clean row side by side (2L
  tokens, positions 0..L-1 twice; BD3-LM's layout, `block_attention_mask`). Sampling runs `Student.cached_hidden`
  against a `cache.KVCache` of the committed blocks: each forward carries the finished blocks not yet cached (the
  prompt's whole blocks at first, then the block just finished) in front of the current block, and computes the
  same attention.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import attends, block_of, shift_source
from .cache import KVCache


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
    def __init__(self, c: StudentConfig, layer: int = 0):
        super().__init__()
        self.c = c
        self.layer = layer  # its index: where its keys and values go in a `KVCache`
        hd = c.hidden_size // c.num_heads
        self.q_proj = nn.Linear(c.hidden_size, c.num_heads * hd, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_kv_heads * hd, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_kv_heads * hd, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_heads * hd, c.hidden_size, bias=c.o_bias)

    def forward(self, x, cos, sin, mask: torch.Tensor | None = None, cache: KVCache | None = None):
        """x: (B, L, hidden); mask: None (every position attends to every other) or (L, n + L) bool, True where
        a query attends, n the positions held in ``cache`` (`KVCache.update` writes this forward's after them)."""
        B, L, _ = x.shape
        c, hd = self.c, self.c.hidden_size // self.c.num_heads
        q = self.q_proj(x).view(B, L, c.num_heads, hd).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, c.num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, c.num_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, Hkv, n + L, D)
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


class DecoderLayer(nn.Module):
    def __init__(self, c: StudentConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.self_attn = Attention(c, layer)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_eps)
        self.mlp = MLP(c)

    def forward(self, x, cos, sin, mask=None, cache=None):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size + 1, c.hidden_size)  # + the mask token
        self.layers = nn.ModuleList(DecoderLayer(c, j) for j in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)


def block_attention_mask(seq_len: int, block_size: int, device=None) -> torch.Tensor:
    """(2L, 2L) bool, True where a query attends, for the noisy row (first L) beside the clean row (last L), by
    `blocks.attends`."""
    blk = block_of(torch.arange(seq_len, device=device), block_size).repeat(2)  # (2L,)
    clean = torch.arange(2 * seq_len, device=device) >= seq_len  # (2L,)
    return attends(blk[:, None], clean[:, None], blk[None, :], clean[None, :])


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
        for layer in self.model.layers:
            h = layer(h, cos, sin, mask, cache)
        return self.model.norm(h)

    def hidden(self, x_t: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """(B, L, H): the hidden state each position of x_t is predicted from (mask token = vocab_size).

        A block student needs ``context`` (B, L), the row its blocks read the blocks before them from: the clean
        row in training and scoring; in sampling and filling, the row as written so far (a block's prediction
        reads only the blocks before it there). A full-attention student ignores it. With the AR shift a position
        reads the state at i-1 (`blocks.shift_source`: a block's first position, the context's)."""
        c = self.config
        L = x_t.shape[1]
        pos = torch.arange(L, device=x_t.device)
        if c.block_size is None:
            h = self._layers(x_t, pos)  # (B, L, H)
            return h[:, shift_source(pos, None)[0]] if c.shift else h
        if context is None:
            raise ValueError("a block student reads its blocks' context beside the noisy row: pass context=")
        mask = block_attention_mask(L, c.block_size, x_t.device)  # (2L, 2L)
        h = self._layers(torch.cat([x_t, context], dim=1), torch.cat([pos, pos]), mask)  # (B, 2L, H)
        noisy, clean = h[:, :L], h[:, L:]
        if not c.shift:
            return noisy
        src, from_clean = shift_source(pos, c.block_size)
        return torch.where(from_clean[None, :, None], clean[:, src], noisy[:, src])

    def cached_hidden(
        self, ids: torch.Tensor, cache: KVCache, *, commit: int, last_clean: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A block student's forward against its cache: ``ids`` (B, S) hold ``commit`` clean tokens (whole blocks,
        kept in ``cache``: the prefill of the prompt's blocks, or the block just finished) and then the current
        block, at the positions that follow the cache's.

        Returns the hidden states the current block's positions are predicted from (B, S - commit, H), as
        `hidden` computes them, and the last clean position's own state (B, H), which predicts the next block's
        first position under the AR shift (``last_clean``: that state from an earlier forward, where this one
        commits nothing)."""
        c = self.config
        S, n = ids.shape[1], cache.length
        keys = torch.arange(n + S, device=ids.device)  # (n + S,) the positions attended to
        pos = keys[n:]  # (S,) this forward's
        k_blk = block_of(keys, c.block_size)
        k_clean = keys < n + commit  # the cached positions and the committed ones are clean
        mask = attends(k_blk[n:, None], k_clean[n:, None], k_blk[None, :], k_clean[None, :])  # (S, n + S)
        h = self._layers(ids, pos, mask, cache)  # (B, S, H)
        cache.advance(commit)
        if commit:
            last_clean = h[:, commit - 1]
        block = h[:, commit:]
        if not c.shift or commit == S:  # (a forward that only commits: nothing to predict)
            return block, last_clean
        src, from_clean = shift_source(pos[commit:], c.block_size)
        shifted = block[:, (src - pos[commit]).clamp(min=0)]  # within the block: i - 1 (the row's first: its own)
        if last_clean is not None:  # the block's first position reads the previous block as committed
            shifted = torch.where(from_clean[None, :, None], last_clean[:, None], shifted)
        return shifted, last_clean

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V): the head covers the teacher's vocabulary only, never the mask token."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return h @ self.model.embed_tokens.weight[: self.config.vocab_size].T

    def forward(
        self, x_t: torch.Tensor, select: torch.Tensor | None = None, context: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Logits (B, L, V), or (M, V) at the M selected positions: ``select`` is a (B, L) bool mask, or the (M,)
        flat indices b·L + i (the training step's, which need no host sync to gather). ``context``: the row a
        block student's blocks read the blocks before them from (`hidden`).

        Selecting before the head keeps the V-sized work proportional to the masked positions. With the AR
        shift, position i reads the hidden state of i-1 (position 0, BOS, is never predicted).
        """
        h = self.hidden(x_t, context)  # (B, L, H)
        if select is None:
            return self.logits(h)
        if select.dtype == torch.bool:
            return self.logits(h[select])
        return self.logits(h.flatten(0, 1).index_select(0, select))  # (M, H) -> (M, V)
