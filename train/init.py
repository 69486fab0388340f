"""`--init-from`: turn an AR checkpoint (Llama/Qwen2 family) into the bidirectional student, weight for weight.

The student uses transformers' parameter names, so the copy is key by key; only the attention becomes
bidirectional (Dream, DiffuLLaMA). The embedding gains one row, the mask token, initialised to the mean
embedding so that it starts as an "average token" rather than noise.
"""

from __future__ import annotations

import torch

from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.hfmodel import first_line, quiet_transformers, resolve_model
from ar2mdm.shared.tokenizer import tokenizer_hash
from ar2mdm.train.model import Student, StudentConfig

SUPPORTED = ("llama", "qwen2", "mistral")


def _rope_theta(cfg) -> float:
    params = getattr(cfg, "rope_parameters", None) or {}
    if params.get("rope_type", "default") not in ("default", None):
        warn(f"--init-from: rope type {params.get('rope_type')!r} is treated as plain RoPE")
    return float(params.get("rope_theta", getattr(cfg, "rope_theta", 10000.0)))


def student_from_ar(spec: str, vocab_size: int, tokenizer_sha: str, max_positions: int) -> Student:
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
        raise UserError(f"--init-from {spec}: its tokenizer differs from the shards' (teacher/student tokenizer mismatch)")
    if c.vocab_size != vocab_size:
        raise UserError(f"--init-from {spec}: vocabulary {c.vocab_size} != the shards' {vocab_size}")
    sc = StudentConfig(
        vocab_size=vocab_size,
        hidden_size=c.hidden_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=getattr(c, "num_key_value_heads", c.num_attention_heads),
        intermediate_size=c.intermediate_size,
        max_positions=max(max_positions, getattr(c, "max_position_embeddings", max_positions)),
        rope_theta=_rope_theta(c),
        rms_eps=c.rms_norm_eps,
        attention_bias=c.model_type == "qwen2" or bool(getattr(c, "attention_bias", False)),
        tie_embeddings=bool(getattr(c, "tie_word_embeddings", False)),
    )
    sc.check()
    student = Student(sc)
    src = ar.state_dict()
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
    student.load_state_dict(dst)
    return student
