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


def text_row(tokenizer, text: str) -> list[int]:
    """BOS + the ids of plain ``text``: how an unconditional row starts, and a plain prompt."""
    return [special_ids(tokenizer)[0]] + tokenizer(text, add_special_tokens=False)["input_ids"]


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


# End-of-turn tokens of common chat templates; with EOS, what ends a response (`stop_ids`)
END_OF_TURN = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>", "<|endoftext|>")


def stop_ids(tokenizer) -> list[int]:
    """Token ids that end a response: EOS and the end-of-turn tokens of the chat templates the vocabulary has."""
    vocab = tokenizer.get_vocab()
    _, eos = special_ids(tokenizer)
    return sorted({eos, *(vocab[t] for t in END_OF_TURN if t in vocab)})


def response_length(ids: np.ndarray, prompt_len: int, stops: list[int]) -> int:
    """Tokens of an SFT row's response: from ``prompt_len`` through the first stop token (the end of turn the
    sampler stops at), without the EOS padding after it; the rest of the row if it has none (truncated)."""
    tail = np.asarray(ids[prompt_len:])
    hit = np.flatnonzero(np.isin(tail, stops))
    return int(hit[0]) + 1 if len(hit) else len(tail)


def end_of_turn_id(tokenizer, chat: bool) -> int:
    """The token that ends an answer: the first stop token the chat template puts after an assistant's reply,
    or EOS (plain rows: the build appends EOS to a response)."""
    _, eos = special_ids(tokenizer)
    if not chat:
        return eos
    turn = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    full = list(_ids(tokenizer.apply_chat_template(turn, tokenize=True)))
    reply = full[len(chat_prompt_ids(tokenizer, turn[:1])) :]
    stops = set(stop_ids(tokenizer))
    return next((t for t in reply if t in stops), eos)


def chat_prompt_ids(tokenizer, messages: list[dict], source: str = "--chat") -> list[int]:
    """The prompt of a chat as the build renders it: the chat template of ``messages`` with the generation
    prompt (the assistant's turn opened), without BOS."""
    if not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{source}: 'messages' rows need a tokenizer with a chat template")
    return list(_ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)))


def sft_prompt_row(prompt_ids: list[int], tokenizer) -> list[int]:
    """``[BOS] + prompt``: the start of an SFT row (a template that opens with BOS does not get a second)."""
    bos, _ = special_ids(tokenizer)
    return [bos] + (prompt_ids[1:] if prompt_ids[:1] == [bos] else prompt_ids)


def user_prompt_row(tokenizer, text: str, chat: bool) -> list[int]:
    """The row start for a user's prompt at sampling time, rendered exactly as the build rendered its rows:
    through the chat template (``messages`` rows) or as plain text (``prompt``/``response`` rows)."""
    if chat:
        return sft_prompt_row(chat_prompt_ids(tokenizer, [{"role": "user", "content": text}]), tokenizer)
    return sft_prompt_row(tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer)


def sft_ids(example: SftExample, tokenizer) -> tuple[list[int], list[int]]:
    """(prompt_ids, response_ids) of an SFT example, without BOS; messages go through the chat template."""
    if example.messages is not None:
        prompt = chat_prompt_ids(tokenizer, example.messages[:-1], example.source)
        full = list(_ids(tokenizer.apply_chat_template(example.messages, tokenize=True)))
        if full[: len(prompt)] != prompt:
            raise UserError(
                f"{example.source}: the chat template does not render the prompt as a prefix of the dialogue"
            )
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
    _, eos = special_ids(tokenizer)
    for ex in examples:
        prompt, response = sft_ids(ex, tokenizer)
        prompt = sft_prompt_row(prompt, tokenizer)  # a chat template that opens with BOS: ours is at position 0
        prompt_len = len(prompt)
        if prompt_len >= seq_len:
            stats.too_long += 1
            warn(
                f"{ex.source}: prompt is {prompt_len - 1} tokens, no room for a response in --seq-len {seq_len}; "
                f"skipped"
            )
            continue
        ids = prompt + response + [eos]
        if len(ids) > seq_len:
            warn(f"{ex.source}: response truncated by {len(ids) - seq_len} tokens to fit --seq-len {seq_len}")
            ids = ids[:seq_len]
        ids += [eos] * (seq_len - len(ids))
        stats.sequences += 1
        yield np.asarray(ids, dtype=np.int32), prompt_len
