"""The student's sampler: fill the masked positions of a batch of rows in a given number of steps.

`denoise` is the loop, `choose` draws the tokens of one step. Each row draws from its own generator, seeded by
the caller, so a row's sample does not depend on the rows it was batched with (on one kind of device: a CUDA
generator draws other numbers than the CPU's). The exported model's ``diffusion_generate`` is this.
"""

from __future__ import annotations

import torch

from .draw import inverse_cdf


def choose(
    probs: torch.Tensor, temperature: float, generators: list[torch.Generator]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens for k positions of each of B rows, and the student's probability of each.

    probs: (B, k, V) float32. temperature 0: the most probable token; > 0: a draw from probs^(1/T) (at T = 1,
    probs itself) by `draw.inverse_cdf`, one uniform per position from its row's generator: one cumulative sum
    over the whole batch, so a batch costs what one row does per position. Returns pred (B, k) long and conf
    (B, k), the probability of pred.
    """
    if temperature > 0:
        tempered = probs if temperature == 1 else torch.softmax(probs.log() / temperature, -1)  # (B, k, V)
        u = torch.stack([torch.rand(probs.shape[1], generator=g, device=probs.device) for g in generators])  # (B, k)
        pred = inverse_cdf(tempered, u)
    else:
        pred = probs.argmax(-1)
    return pred, probs.gather(-1, pred[..., None])[..., 0]


@torch.no_grad()
def denoise(
    model,
    x: torch.Tensor,
    steps: int,
    *,
    temperature: float = 1.0,
    remasking: str = "random",
    seeds: list[int] | None = None,
    span_length: int | None = None,
    stop_ids: tuple[int, ...] = (),
    on_step=None,
    return_forwards: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Fill the masked positions of ``x`` (B, S) (mask id = the model's vocab_size) in ``steps`` steps.

    Every row holds its masks at the same positions (a prompt of the same length), so each step reveals the
    same number of tokens in every row, as many as a linear schedule allows, and the rest stay masked to be
    predicted again next step. ``remasking`` says which are revealed: ``random`` (the order of MDLM's ancestral
    sampler; with ``temperature`` 1, samples of the student's own distribution) picks the positions at random
    first and draws only theirs, so a step computes the head and the draws at those positions alone;
    ``low-confidence`` (LLaDA) predicts every masked token of the current span (greedy at ``temperature`` 0, or
    drawn) and reveals the most confident. ``span_length``: LLaDA's semi-autoregressive decoding (its "block
    length"; the student still attends to the whole row): the masked positions are revealed span by span, left to
    right, ``steps`` shared evenly among the spans; a later span stays masked (and attended to) until its turn,
    and once every row holds one of ``stop_ids`` in a finished span the rest stay masked. ``seeds``: one per row
    (default 0, 1, ...), the seed of that row's draws, made on the rows' device. ``on_step(s, x)``: called with
    the rows as they are before the s-th step that reveals tokens (s = 0, 1, ...; `planned_steps` of them): the
    states the sampler visits. ``return_forwards``: also the forwards each row needed (B,) long: the steps taken, which
    every row shares.
    """
    mask_id = model.config.mask_id
    x = x.clone()
    B, S = x.shape
    masks = x == mask_id  # (B, S)
    if not bool((masks == masks[:1]).all()):
        raise ValueError("denoise: every row must hold its masks at the same positions")
    seeds = seeds if seeds is not None else range(B)
    generators = [torch.Generator(device=x.device).manual_seed(int(s)) for s in seeds]
    todo = masks[0].nonzero()[:, 0]  # (N,) the positions to fill
    spans = list(todo.split(span_length)) if span_length else [todo]
    span_steps = max(1, steps // len(spans))
    rows = torch.arange(B, device=x.device)[:, None]  # (B, 1)
    done = 0  # positions of `todo` in finished spans
    taken = 0  # steps that revealed tokens so far
    for span in spans:
        length = len(span)
        n_steps = min(span_steps, length)
        in_span = torch.zeros(S, dtype=torch.bool, device=x.device)
        in_span[span] = True
        for s in range(n_steps):
            here = (x == mask_id) & in_span  # (B, S): this span's masked positions, as many in every row
            left = int(here[0].sum())
            reveal = left - int(length * (1 - (s + 1) / n_steps))
            if reveal <= 0:
                continue
            if on_step is not None:
                on_step(taken, x)
            taken += 1
            pos = here.nonzero()[:, 1].view(B, left)  # (B, left), ascending
            if remasking == "random":  # the positions first, then the tokens at those alone
                pick = torch.stack([torch.rand(left, generator=g, device=x.device) for g in generators])
                pos = pos.gather(1, pick.topk(reveal, dim=1).indices).sort(1).values  # (B, reveal)
                here = torch.zeros_like(here)
                here[rows, pos] = True
            probs = torch.softmax(model(x, here).float(), -1).view(B, pos.shape[1], -1)  # (B, k, V)
            pred, conf = choose(probs, temperature, generators)  # (B, k)
            if remasking == "random":
                x[rows, pos] = pred
                continue
            top = conf.topk(reveal, dim=1).indices  # (B, reveal): the most confident
            x[rows, pos.gather(1, top)] = pred.gather(1, top)
        done += length
        if stop_ids and bool(torch.isin(x[:, todo[:done]], torch.tensor(stop_ids, device=x.device)).any(1).all()):
            break  # every row's response ended: the later spans are not computed
    return (x, torch.full((B,), taken, dtype=torch.long)) if return_forwards else x


def planned_steps(n_masked: int, steps: int, span_length: int | None = None) -> int:
    """The steps `denoise` takes to fill ``n_masked`` positions (each reveals at least one token), fewer only where
    every row's answer ends early."""
    spans = [min(span_length, n_masked - a) for a in range(0, n_masked, span_length)] if span_length else [n_masked]
    per_span = max(1, steps // len(spans))
    return sum(min(per_span, n) for n in spans)


def cut_at_stop(ids: list[int], stop_ids: tuple[int, ...] | list[int], keep_stop: bool = False) -> list[int]:
    """``ids`` up to their first stop token (included with ``keep_stop``): nothing after an end of turn."""
    for j, t in enumerate(ids):
        if t in stop_ids:
            return ids[: j + 1] if keep_stop else ids[:j]
    return ids
