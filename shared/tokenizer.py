"""Tokenizer helpers both stages share: special ids, a stable hash, and packing text into fixed-length rows.

Row layout (the contract of schema v1): position 0 holds BOS (or EOS where the tokenizer has no BOS) and is
never masked; documents are separated by EOS; an SFT row is ``[BOS, prompt, response, EOS, EOS...]`` where the
EOS padding belongs to the response (as in LLaDA, the student learns where a response ends).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Iterable, Iterator

import numpy as np

from ar2mdm.shared.corpus import Document, SftExample
from ar2mdm.shared.errors import UserError, warn


def special_ids(tokenizer) -> tuple[int, int]:
    """(bos_id, eos_id): BOS falls back to EOS for tokenizers without one; a tokenizer without EOS is refused."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise UserError("the tokenizer has no EOS token; ar2mdm separates documents with it")
    bos = tokenizer.bos_token_id
    return (eos if bos is None else bos), eos


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, sorted) and the special tokens.

    Two tokenizers with the same hash map text to the same ids, whatever file format they were loaded from
    (a GGUF file and the safetensors folder converted from it hash the same).
    """
    bos, eos = special_ids(tokenizer)
    payload = {"vocab": sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), "bos": bos, "eos": eos}
    return hashlib.sha256(json.dumps(payload, ensure_ascii=False).encode()).hexdigest()


@dataclass
class PackStats:
    sequences: int = 0
    tokens_dropped: int = 0  # the tail of the packed stream that does not fill a whole row
    too_long: int = 0


def pack_documents(
    docs: Iterable[Document], tokenizer, seq_len: int, stats: PackStats | None = None
) -> Iterator[np.ndarray]:
    """Pack documents into rows of ``seq_len`` int32 ids: BOS, then the token stream with EOS after each document."""
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    stats = stats if stats is not None else PackStats()
    bos, eos = special_ids(tokenizer)
    body = seq_len - 1
    buf: list[int] = []
    for doc in docs:
        buf.extend(tokenizer(doc.text, add_special_tokens=False)["input_ids"])
        buf.append(eos)
        start = 0
        while len(buf) - start >= body:
            stats.sequences += 1
            yield np.asarray([bos] + buf[start : start + body], dtype=np.int32)
            start += body
        del buf[:start]
    stats.tokens_dropped += len(buf)


def sft_ids(example: SftExample, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of an SFT example, without BOS; messages go through the chat template."""
    if example.messages is not None:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError(f"{example.source}: 'messages' rows need a tokenizer with a chat template")
        full = tokenizer.apply_chat_template(example.messages, tokenize=True)
        prompt = tokenizer.apply_chat_template(example.messages[:-1], tokenize=True, add_generation_prompt=True)
        full, prompt = list(_ids(full)), list(_ids(prompt))
        if full[: len(prompt)] != prompt:
            raise UserError(f"{example.source}: the chat template does not render the prompt as a prefix of the dialogue")
        return prompt, full[len(prompt) :]
    prompt = tokenizer(example.prompt, add_special_tokens=False)["input_ids"]
    response = tokenizer(example.response, add_special_tokens=False)["input_ids"]
    return list(prompt), list(response)


def _ids(x):
    # apply_chat_template returns a list, or a BatchEncoding in newer transformers
    return x["input_ids"] if hasattr(x, "keys") else x


def pack_sft(
    examples: Iterable[SftExample], tokenizer, seq_len: int, stats: PackStats | None = None
) -> Iterator[tuple[np.ndarray, int]]:
    """SFT rows ``[BOS, prompt, response, EOS, EOS...]`` of ``seq_len`` ids with their prompt length.

    The prompt length counts BOS; positions >= prompt_len are the response (EOS padding included).
    Responses that do not fit are truncated (with a warning); prompts that leave no room are skipped.
    """
    stats = stats if stats is not None else PackStats()
    bos, eos = special_ids(tokenizer)
    for ex in examples:
        prompt, response = sft_ids(ex, tokenizer)
        if prompt[:1] == [bos]:  # a chat template that opens with BOS: ours is already at position 0
            prompt = prompt[1:]
        prompt_len = 1 + len(prompt)
        if prompt_len >= seq_len:
            stats.too_long += 1
            warn(f"{ex.source}: prompt is {len(prompt)} tokens, no room for a response in --seq-len {seq_len}; skipped")
            continue
        ids = [bos] + prompt + response + [eos]
        if len(ids) > seq_len:
            warn(f"{ex.source}: response truncated by {len(ids) - seq_len} tokens to fit --seq-len {seq_len}")
            ids = ids[:seq_len]
        ids += [eos] * (seq_len - len(ids))
        stats.sequences += 1
        yield np.asarray(ids, dtype=np.int32), prompt_len
