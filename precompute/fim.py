"""Fill-in-the-middle targets (seed §5) from a code teacher that has FIM tokens.

The target for position i is the teacher's next-token distribution after the token-level prompt

    <fim_prefix> x[1:i] <fim_suffix> x[i+1:i+1+W] <fim_middle>

(prefix-suffix-middle order; the row's BOS is not part of the prefix; ``--window W`` may cut the suffix).
It is conditioned on the clean row, like topk. One prompt per target position, batched with right padding.
"""

from __future__ import annotations

import torch

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
    model, rows: torch.Tensor, positions: list[torch.Tensor], fim: tuple[int, int, int], window: int | None,
    top_n: int, token_budget: int = 4096,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per row: (ids (P, n), log-probs (P, n)) of the top-n of p_T(. | FIM prompt) at each target position."""
    dev = rows.device
    prompts = []  # (row, slot, ids)
    for b, pos in enumerate(positions):
        x = rows[b].tolist()
        for p, i in enumerate(pos.tolist()):
            prompts.append((b, p, fim_prompt(x, i, fim, window)))
    order = sorted(range(len(prompts)), key=lambda j: len(prompts[j][2]))
    n = min(top_n, model.get_output_embeddings().weight.shape[0])
    out_ids = [torch.zeros(len(p), n, dtype=torch.long) for p in positions]
    out_lp = [torch.zeros(len(p), n) for p in positions]
    a = 0
    while a < len(order):
        S = len(prompts[order[a]][2])
        b = a + 1
        while b < len(order) and (b + 1 - a) * len(prompts[order[b]][2]) <= token_budget:
            b += 1
        batch = [prompts[j] for j in order[a:b]]
        S = max(len(p[2]) for p in batch)
        ids = torch.zeros(len(batch), S, dtype=torch.long)
        att = torch.zeros(len(batch), S, dtype=torch.long)
        for j, (_, _, pr) in enumerate(batch):
            ids[j, : len(pr)] = torch.tensor(pr)
            att[j, : len(pr)] = 1
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits  # (B, S, V)
        last = logits[torch.arange(len(batch)), att.sum(1).to(dev) - 1].float()  # (B, V) at each prompt's end
        lp = torch.log_softmax(last, dim=-1)
        v, i = lp.topk(n, dim=-1)
        for j, (row, slot, _) in enumerate(batch):
            out_ids[row][slot] = i[j].cpu()
            out_lp[row][slot] = v[j].cpu()
        a = b
    return list(zip(out_ids, out_lp))
