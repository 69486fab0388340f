"""Tiny random teachers for unit tests: a character-level tokenizer and a 2-layer Llama, saved as a HF folder."""

from __future__ import annotations

import string
from pathlib import Path

import pytest
import torch

# the CPU always; CUDA where there is one (marked `gpu`: `pytest -m gpu` runs the CUDA half on a GPU machine)
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]

CHARS = list(string.ascii_lowercase + " .,;:!?'\n")


def char_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for c in CHARS:
        vocab[c] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def tiny_llama(
    vocab_size: int,
    seed: int = 0,
    *,
    max_positions: int = 256,
    layers: int = 2,
    sharpness: float = 20.0,
    hidden: int = 32,
):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    # Larger logits than the default init, so distributions are far from uniform and errors show.
    with torch.no_grad():
        model.lm_head.weight.mul_(sharpness)
    return model


FIM_TOKENS = ["<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
# ChatML in miniature: every turn is <|im_start|> + the role's initial + space + content + <|im_end|> + newline
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'][0] }} {{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>a {% endif %}"
)


def save_tiny_teacher(
    folder: Path, *, seed: int = 0, max_positions: int = 256, fim: bool = False, hidden: int = 32, chat: bool = False
) -> Path:
    tok = char_tokenizer()
    if fim:
        tok.add_special_tokens({"additional_special_tokens": FIM_TOKENS})
    if chat:
        tok.add_special_tokens({"additional_special_tokens": CHAT_TOKENS})
        tok.chat_template = CHAT_TEMPLATE
    model = tiny_llama(len(tok), seed=seed, max_positions=max_positions, hidden=hidden)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


TEXT = (
    "when shall we three meet again in thunder, lightning, or in rain? when the hurlyburly's done, when the "
    "battle's lost and won. that will be ere the set of sun. where the place? upon the heath. there to meet "
    "with macbeth. i come, graymalkin! paddock calls. anon. fair is foul, and foul is fair: hover through the "
    "fog and filthy air.\n"
)
