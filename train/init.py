"""`--init-from`: turn an AR checkpoint (Llama/Qwen2 family) into the bidirectional student, weight for weight.

The student uses transformers' parameter names, so the copy is key by key; only the attention becomes
bidirectional (Dream, DiffuLLaMA), or block-causal for a block student (Fast-dLLM v2), and by default the AR shift
is kept: x_i is predicted from the hidden state
at i-1, as the copied head was trained to. The embedding gains one row, the mask token, initialised to the mean
embedding so that it starts as an "average token" rather than noise. RoPE scaling and biases are carried over;
a checkpoint parameter the student has no place for is refused, never dropped.
"""

from __future__ import annotations

import torch

from ar2mdm.shared.errors import UserError
from ar2mdm.shared.hfmodel import first_line, quiet_transformers, resolve_model
from ar2mdm.shared.tokenizer import tokenizer_hash
from ar2mdm.student.model import ROPE_TYPES, Student, StudentConfig
from ar2mdm.train.presets import checked

SUPPORTED = ("llama", "qwen2", "mistral")


def _rope(cfg) -> tuple[float, dict | None]:
    """(theta, scaling) from a transformers config: 5.x keeps both in rope_parameters, 4.x in rope_theta and
    rope_scaling (whose older spelling of the kind is "type")."""
    params = dict(getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {})
    theta = float(params.pop("rope_theta", getattr(cfg, "rope_theta", 10000.0)))
    kind = params.pop("rope_type", params.pop("type", "default")) or "default"
    if kind not in ROPE_TYPES:
        raise UserError(f"--init-from: RoPE scaling {kind!r} is not supported (supported: {', '.join(ROPE_TYPES)})")
    return theta, (None if kind == "default" else {"rope_type": kind, **params})


def student_from_ar(
    spec: str,
    vocab_size: int,
    tokenizer_sha: str,
    max_positions: int,
    *,
    shift: bool = True,
    block_size: int | None = None,
) -> Student:
    """The AR checkpoint ``spec`` as a bidirectional student (with the AR shift unless ``shift`` is False; a block
    student with ``block_size``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, _ = resolve_model(spec)
    quiet_transformers()
    try:
        ar = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"--init-from {spec} does not load: {first_line(e)}") from e
    c = ar.config
    if c.model_type not in SUPPORTED:
        raise UserError(f"--init-from {spec}: model type {c.model_type!r}, supported: {', '.join(SUPPORTED)}")
    if tokenizer_hash(tok) != tokenizer_sha:
        raise UserError(
            f"--init-from {spec}: its tokenizer differs from the shards' (teacher/student tokenizer mismatch)"
        )
    if c.vocab_size != vocab_size:
        raise UserError(f"--init-from {spec}: vocabulary {c.vocab_size} != the shards' {vocab_size}")
    src = ar.state_dict()
    theta, scaling = _rope(c)
    layer0 = "model.layers.0."
    sc = StudentConfig(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", c.num_attention_heads),
        intermediate_size=c.intermediate_size,
        max_positions=max(max_positions, getattr(c, "max_position_embeddings", max_positions)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_eps=c.rms_norm_eps,
        # biases as the weights have them (Qwen2: q/k/v; Llama attention_bias: q/k/v/o; mlp_bias)
        attention_bias=layer0 + "self_attn.q_proj.bias" in src,
        o_bias=layer0 + "self_attn.o_proj.bias" in src,
        mlp_bias=layer0 + "mlp.gate_proj.bias" in src,
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
        shift=shift,
        block_size=block_size,
    )
    student = Student(checked(sc, f"--init-from {spec}"))
    dst = student.state_dict()
    with torch.no_grad():
        for name, t in dst.items():
            if name == "model.embed_tokens.weight":
                emb = src[name]  # (V, H)
                t[:vocab_size].copy_(emb)
                t[vocab_size].copy_(emb.mean(0))
            elif name in src:
                t.copy_(src[name])
            else:
                raise UserError(f"--init-from {spec}: parameter {name} missing from the checkpoint")
    tied = {"lm_head.weight"} if sc.tie_embeddings else set()
    extra = sorted(k for k in src if k not in dst and k not in tied and "rotary_emb" not in k)
    if extra:
        raise UserError(
            f"--init-from {spec}: the student has no place for {len(extra)} checkpoint parameter(s), "
            f"e.g. {extra[0]} ({c.model_type} layers differ from Llama's)"
        )
    student.load_state_dict(dst)
    return student
