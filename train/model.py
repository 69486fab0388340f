"""The bidirectional student: Llama-style blocks (RoPE, RMSNorm, SwiGLU) with full non-causal SDPA attention.

Parameter names follow transformers' Llama/Qwen2 layout (``model.layers.N.self_attn.q_proj`` ...), so that
`--init-from` copies an AR checkpoint key by key and only the attention mask changes (as Dream and
DiffuLLaMA adapt AR models). The input embedding has one more row than the teacher's vocabulary: the mask
token; the output head predicts only the teacher's vocabulary.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ar2mdm.shared.errors import UserError

PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=384),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=768),
    "base": dict(hidden_size=576, num_layers=12, num_heads=9, num_kv_heads=3, intermediate_size=1536),
    # ~350M with the 49k vocabulary (tied): for a GPU
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=3072),
}


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
    # the AR shift (Dream, DiffuLLaMA): x_i is predicted from the hidden state at i-1, as the AR head was
    # trained to; on by default for --init-from, so the copied head is used for what it learnt
    shift: bool = False

    @property
    def mask_id(self) -> int:
        return self.vocab_size

    def check(self) -> None:
        if self.vocab_size < 2:
            raise UserError(f"student vocab_size {self.vocab_size} is too small")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise UserError(
                f"student config: hidden_size {self.hidden_size} must divide by num_heads {self.num_heads}, "
                f"and num_heads by num_kv_heads {self.num_kv_heads}"
            )
        if (self.hidden_size // self.num_heads) % 2:
            raise UserError("student config: head dimension must be even for RoPE")
        kind = (self.rope_scaling or {}).get("rope_type", "default")
        if kind not in ROPE_TYPES:
            raise UserError(
                f"student config: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})"
            )

    @classmethod
    def from_spec(cls, spec: str, vocab_size: int, max_positions: int, shift: bool = False) -> "StudentConfig":
        """A preset name or a JSON file; vocab_size comes from the shards, never from the user."""
        if spec in PRESETS:
            fields = dict(PRESETS[spec])
        else:
            p = Path(spec)
            if not p.exists():
                raise UserError(f"--student {spec}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
            try:
                fields = json.loads(p.read_text())
            except json.JSONDecodeError as e:
                raise UserError(f"--student {spec}: not valid JSON ({e.msg})") from e
            if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
                raise UserError(
                    f"--student {spec}: vocab_size {fields['vocab_size']} does not fit the shards' vocabulary "
                    f"({vocab_size})"
                )
            fields.pop("vocab_size", None)
        fields.setdefault("max_positions", max_positions)
        fields.setdefault("shift", shift)
        try:
            cfg = cls(vocab_size=vocab_size, **fields)
        except TypeError as e:
            raise UserError(f"--student {spec}: {e}") from e
        cfg.check()
        return cfg

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

    def forward(self, x, cos, sin, causal: bool = False):
        B, L, _ = x.shape
        c, hd = self.c, self.c.hidden_size // self.c.num_heads
        q = self.q_proj(x).view(B, L, c.num_heads, hd).transpose(1, 2)  # (B, H, L, D)
        k = self.k_proj(x).view(B, L, c.num_kv_heads, hd).transpose(1, 2)  # (B, Hkv, L, D)
        v = self.v_proj(x).view(B, L, c.num_kv_heads, hd).transpose(1, 2)
        q, k = rope(q, cos, sin), rope(k, cos, sin)
        rep = c.num_heads // c.num_kv_heads
        # grouped-query heads go to the flash kernel as they are (enable_gqa), not copied rep times; only flash
        # reads them so (CUDA, half precision: pre-Ampere GPUs lack it too), and every other kernel would take
        # enable_gqa to the unfused math kernel, slower than copying (pytorch#181528), so the rest copy
        gqa = rep > 1 and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16)
        if rep > 1 and not gqa:
            k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)  # bidirectional unless asked
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

    def forward(self, x, cos, sin, causal: bool = False):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, causal)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    def __init__(self, c: StudentConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size + 1, c.hidden_size)  # + the mask token
        self.layers = nn.ModuleList(Block(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.rms_eps)


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

    def hidden(self, x_t: torch.Tensor, causal: bool = False) -> torch.Tensor:
        """x_t: (B, L) ids (mask token = vocab_size) -> (B, L, H) final hidden states.

        ``causal`` only serves checks that a converted AR checkpoint reproduces its teacher exactly.
        """
        c = self.config
        pos = torch.arange(x_t.shape[1], device=x_t.device)
        h = self.model.embed_tokens(x_t)
        cos, sin = rope_cos_sin(pos, rope_inv_freq(c.hidden_size // c.num_heads, c.rope_theta, c.rope_scaling), h.dtype)
        for layer in self.model.layers:
            h = layer(h, cos, sin, causal)
        return self.model.norm(h)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(..., H) -> (..., V): the head covers the teacher's vocabulary only, never the mask token."""
        if self.lm_head is not None:
            return self.lm_head(h)
        return h @ self.model.embed_tokens.weight[: self.config.vocab_size].T

    def forward(self, x_t: torch.Tensor, select: torch.Tensor | None = None, causal: bool = False) -> torch.Tensor:
        """Logits (B, L, V), or (M, V) at the M selected positions: ``select`` is a (B, L) bool mask, or the (M,)
        flat indices b·L + i (the training step's, which need no host sync to gather).

        Selecting before the head keeps the V-sized work proportional to the masked positions. With the AR
        shift, position i reads the hidden state of i-1 (position 0, BOS, is never predicted).
        """
        h = self.hidden(x_t, causal)  # (B, L, H)
        if self.config.shift:
            h = torch.cat([h[:, :1], h[:, :-1]], dim=1)  # (B, L, H): h'_i = h_{i-1}
        if select is None:
            return self.logits(h)
        if select.dtype == torch.bool:
            return self.logits(h[select])
        return self.logits(h.flatten(0, 1).index_select(0, select))  # (M, H) -> (M, V)
