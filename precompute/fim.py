"""Fill-in-the-middle targets (docs/design.md §5) from a code teacher that has FIM tokens.

The target for position i is the teacher's next-token distribution after the token-level prompt

    <fim_prefix> x[1:i] <fim_suffix> x[i+1:i+1+W] <fim_middle>

(prefix-suffix-middle order; the row's BOS is not part of the prefix; ``--window W`` may cut the suffix).
It is conditioned on the clean row, like topk. One prompt per target position, batched with right padding.
"""

from __future__ import annotations

import torch

from ar2mdm.precompute.forward import budget_batches, check_finite, hidden_states, log_softmax_head
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


def fim_prompt(x: list[int], i: int, fim: tuple[int, int, int], window: int | None) -> list[int]:
    """The PSM prompt for target position i of row x (a list of ids, x[0] = BOS)."""
    pre, suf, mid = fim
    end = len(x) if window is None else min(len(x), i + 1 + window)
    return [pre] + x[1:i] + [suf] + x[i + 1 : end] + [mid]


@torch.no_grad()
def fim_targets(
    model,
    rows: torch.Tensor,
    positions: list[torch.Tensor],
    fim: tuple[int, int, int],
    *,
    window: int | None,
    top_n: int,
    token_budget: int = 4096,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (ids (P, n), log-probs (P, n)) of the top-n of p_T(. | FIM prompt) at each target position."""
    dev = rows.device
    prompts = []  # (row, slot, ids)
    for b, pos in enumerate(positions):
        x = rows[b].tolist()
        for p, i in enumerate(pos.tolist()):
            prompts.append((b, p, fim_prompt(x, i, fim, window)))
    n = min(top_n, model.get_output_embeddings().weight.shape[0])
    out_ids = [torch.zeros(len(p), n, dtype=torch.long) for p in positions]
    out_lp = [torch.zeros(len(p), n) for p in positions]
    for idx in budget_batches([len(p[2]) for p in prompts], token_budget):
        batch = [prompts[j] for j in idx]
        S = max(len(p[2]) for p in batch)
        ids = torch.zeros(len(batch), S, dtype=torch.long)
        att = torch.zeros(len(batch), S, dtype=torch.long)
        for j, (_, _, pr) in enumerate(batch):
            ids[j, : len(pr)] = torch.tensor(pr)
            att[j, : len(pr)] = 1
        h = hidden_states(model, ids.to(dev), attention_mask=att.to(dev))  # (B, S, H)
        # the head only at each prompt's last token: B x V logits, not B x S x V (V is 152k for Qwen)
        lp = log_softmax_head(model, h[torch.arange(len(batch)), att.sum(1).to(dev) - 1])  # (B, V)
        v, i = lp.topk(n, dim=-1)
        check_finite(v, "fim log-probs")
        v, i = v.cpu(), i.cpu()  # one copy per batch: a copy per prompt waited on the device each time
        for j, (row, slot, _) in enumerate(batch):
            out_ids[row][slot] = i[j]
            out_lp[row][slot] = v[j]
    return list(zip(out_ids, out_lp))
