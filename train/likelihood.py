"""How a student scores a continuation given a context: the log-likelihoods `kdtrain lm-eval` reports.

A diffusion student has no left-to-right factorisation of its own; two are in use (docs/usage.md, lm-eval):

- ``chain`` (the default; Fast-dLLM v2's for block students): the continuation's tokens scored left to right, each
  given the context, the continuation's tokens before it, and every later position masked:
  log p(x_i | x_<i, [MASK] at i+1..). It is the exact log-probability of the student writing the continuation one
  token a forward, left to right, so it is deterministic and comparable with an AR model's; a block student at
  block size 1 is an AR model and scores as one. A block student sees only the clean blocks before a block, so one
  forward scores the i-th position of every block at once: B forwards a continuation (a full-attention student:
  one a token). ``greedy``: each token is its conditional's most probable.
- ``elbo`` (LLaDA's and Dream's): the MDLM bound on -log p(continuation | context), a Monte Carlo estimate over
  ``draws`` masks (`evaluate.elbo_row_estimates`; a block student's bound is the sum of its blocks' given the clean
  blocks before them). A bound, not the likelihood: it is at most the chain's probability in expectation for an
  ideal model, and it carries a standard error over its draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2mdm.student.blocks import block_of


@dataclass
class Scored:
    """One continuation's score: its log-likelihood (nats), whether greedy decoding writes it, and the standard
    error of the estimate (0 where it is exact)."""

    logprob: float
    greedy: bool
    se: float = 0.0


def whole_blocks(ids: list[int], block_size: int | None, mask_id: int) -> list[int]:
    """``ids`` padded with the mask token to whole blocks, as the block sampler lays a completion out: the end of
    the last block is positions still to be written."""
    if block_size is None:
        return list(ids)
    return list(ids) + [mask_id] * (-len(ids) % block_size)


@torch.no_grad()
def chain_scores(model, ids: list[int], start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp (n,), argmax (n,)) for the n = len(ids) - start continuation tokens ids[start:], each given every
    token before it with the later continuation positions masked (the ``chain`` rule above)."""
    c, dev = model.config, model.model.embed_tokens.weight.device
    n = len(ids) - start
    row = torch.tensor(whole_blocks(ids, c.block_size, c.mask_id), device=dev)  # (L,)
    pos = torch.arange(len(row), device=dev)
    cont = (pos >= start) & (pos < len(ids))  # (L,)
    if c.block_size is None:
        # forward j masks continuation positions >= start + j and reads start + j
        steps = torch.arange(n, device=dev)
        hidden = cont[None, :] & (pos[None, :] >= start + steps[:, None])  # (n, L)
        read = (start + steps)[:, None] == pos[None, :]  # (n, L): one position each
    else:
        # forward j masks, in every block, the continuation positions at in-block offset >= j, and reads offset j
        steps = torch.arange(c.block_size, device=dev)
        offset = pos - block_of(pos, c.block_size) * c.block_size  # (L,)
        hidden = cont[None, :] & (offset[None, :] >= steps[:, None])  # (B, L)
        read = cont[None, :] & (offset[None, :] == steps[:, None])  # (B, L)
    x_t = torch.where(hidden, c.mask_id, row[None, :])  # (F, L)
    logits = model(x_t, read, context=row[None, :].expand_as(x_t))  # (n, V), in (forward, position) order
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision scores in float32
    at = read.nonzero()[:, 1]  # (n,) the position each row of logits scores
    logits = logits[at.argsort()]  # position order
    truth = row[pos[cont]]  # (n,)
    logp = torch.log_softmax(logits, -1).gather(-1, truth[:, None])[:, 0]
    return logp, logits.argmax(-1) == truth


@torch.no_grad()
def elbo_score(model, ids: list[int], start: int, draws: int, g: torch.Generator) -> tuple[float, float]:
    """(estimate, standard error) of the ELBO of ids[start:] given ids[:start] in nats (a log-likelihood bound:
    minus the bound on the negative log-likelihood), from ``draws`` independent masks."""
    from ar2mdm.train.evaluate import elbo_row_estimates

    c, dev = model.config, model.model.embed_tokens.weight.device
    row = torch.tensor([whole_blocks(ids, c.block_size, c.mask_id)], device=dev)  # (1, L)
    pos = torch.arange(row.shape[1], device=dev)
    maskable = ((pos >= start) & (pos < len(ids)))[None, :]
    est = torch.cat([elbo_row_estimates(model, row, maskable, 1, g, mask_id=c.mask_id)[0] for _ in range(draws)])
    se = float(est.std() / draws**0.5) if draws > 1 else float("nan")
    return -float(est.mean()), se


def score(model, ids: list[int], start: int, *, likelihood: str, draws: int, g: torch.Generator) -> Scored:
    """ids[start:] given ids[:start] by the ``likelihood`` rule (``chain`` or ``elbo``); ``greedy`` always by the
    chain's argmax (LAMBADA's accuracy reads it)."""
    logp, greedy = chain_scores(model, ids, start)
    if likelihood == "chain":
        return Scored(logprob=float(logp.sum()), greedy=bool(greedy.all()))
    value, se = elbo_score(model, ids, start, draws, g)
    return Scored(logprob=value, greedy=bool(greedy.all()), se=se)
