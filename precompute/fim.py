"""Fill-in-the-middle targets (docs/design.md §5) from a code teacher that has FIM tokens.

The target for position i is the teacher's next-token distribution after the token-level prompt

    <fim_prefix> x[1:i] <fim_suffix> x[i+1:i+1+n] <fim_middle>

(prefix-suffix-middle order; the row's BOS is not part of the prefix); the suffix's length n is
`shared.blocks.right_context`: the rest of the row, or of i's block, at most ``--window`` tokens. It is
conditioned on the clean row, like topk. One prompt per target position; the backend returns the top-n after each
(`TorchTeacher.next_token_top`, `VllmTeacher.next_token_top`).
"""

from __future__ import annotations

import torch

from ar2mdm.shared.blocks import right_context
from ar2mdm.shared.errors import UserError

FIM_TOKEN_SETS = (
    ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>"),  # Qwen2.5-Coder
    ("<fim_prefix>", "<fim_suffix>", "<fim_middle>"),  # StarCoder, SantaCoder
    ("<fim-prefix>", "<fim-suffix>", "<fim-middle>"),  # SantaCoder v1
)


def fim_token_ids(tokenizer) -> tuple[int, int, int]:
    """(prefix, suffix, middle) ids of the teacher's FIM tokens; a one-line error if it has none."""
    vocab = tokenizer.get_vocab()
    for names in FIM_TOKEN_SETS:
        if all(n in vocab for n in names):
            return tuple(vocab[n] for n in names)  # type: ignore[return-value]
    looked = "; ".join(" ".join(s) for s in FIM_TOKEN_SETS)
    raise UserError(f"--mode fim needs a teacher with FIM tokens; its tokenizer has none of: {looked}")


def fim_prompt(x: list[int], i: int, fim: tuple[int, int, int], n: int) -> list[int]:
    """The PSM prompt for target position i of row x (a list of ids, x[0] = BOS) with n tokens of suffix."""
    pre, suf, mid = fim
    return [pre] + x[1:i] + [suf] + x[i + 1 : i + 1 + n] + [mid]


def fim_targets(
    backend,
    rows: torch.Tensor,
    positions: list[torch.Tensor],
    fim: tuple[int, int, int],
    *,
    window: int | None,
    block_size: int | None,
    top_n: int,
    token_budget: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (ids (P, n), log-probs (P, n)) of the top-n of p_T(. | FIM prompt) at each target position.

    rows: (B, L) long on the host; backend: a `teacher.Backend`."""
    L = rows.shape[1]
    prompts = []
    for b, pos in enumerate(positions):
        x = rows[b].tolist()
        prompts += [fim_prompt(x, i, fim, right_context(i, L, window, block_size)) for i in pos.tolist()]
    ids, lps = backend.next_token_top(prompts, top_n, token_budget)  # (Q, n) each, rows' positions one after another
    sizes = [len(p) for p in positions]
    return list(zip(ids.split(sizes), lps.split(sizes)))
