"""How a student scores a continuation given a context: the log-likelihoods `kdtrain lm-eval` reports.

A diffusion student has no left-to-right factorisation of its own; two are in use (docs/usage.md, lm-eval):

- ``chain`` (the default; Fast-dLLM v2's for block students): the continuation's tokens scored left to right, each
  given the context, the continuation's tokens before it, and every later position masked:
  log p(x_i | x_<i, [MASK] at i+1..). It is the exact log-probability of the student writing the continuation one
  token a forward, left to right, so it is deterministic and comparable with an AR model's; a block student at
  block size 1 is an AR model and scores as one. A block student sees only the clean blocks before a block: its
  context is computed once into a KV cache, then each block of the continuation is one forward of B rows (row i
  masks from its i-th position on), as the sampler runs it; a full-attention student takes one row a token.
  ``greedy``: each token is its conditional's most probable.
- ``elbo`` (LLaDA's and Dream's): the MDLM bound on -log p(continuation | context), a Monte Carlo estimate over
  ``draws`` masks (`evaluate.elbo_row_estimates`; a block student's bound is the sum of its blocks' given the clean
  blocks before them). A lower bound on the log-likelihood of the student's random-order generative process (not
  of the left-to-right one the chain scores), estimated: it carries a standard error over its draws.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2mdm.student.blocks import block_of
from ar2mdm.student.cache import KVCache


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
    row = torch.tensor(whole_blocks(ids, c.block_size, c.mask_id), device=dev)  # (L,)
    pos = torch.arange(len(row), device=dev)
    cont = (pos >= start) & (pos < len(ids))  # (L,)
    if c.block_size is None:
        logits = full_chain_logits(model, row, cont, start)
    else:
        logits = block_chain_logits(model, row, cont, start)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # half precision scores in float32
    truth = row[cont]  # (n,)
    logp = torch.log_softmax(logits, -1).gather(-1, truth[:, None])[:, 0]
    return logp, logits.argmax(-1) == truth


def full_chain_logits(model, row: torch.Tensor, cont: torch.Tensor, start: int) -> torch.Tensor:
    """(n, V): forward j masks the continuation positions >= start + j and reads start + j (n forwards in one
    batch: a full-attention student sees the whole row)."""
    pos = torch.arange(len(row), device=row.device)
    steps = torch.arange(int(cont.sum()), device=row.device)
    hidden = cont[None, :] & (pos[None, :] >= start + steps[:, None])  # (n, L)
    read = (start + steps)[:, None] == pos[None, :]  # (n, L): one position each, in order
    x_t = torch.where(hidden, model.config.mask_id, row[None, :])
    return model(x_t, read)


def block_chain_logits(model, row: torch.Tensor, cont: torch.Tensor, start: int) -> torch.Tensor:
    """(n, V) for a block student, in position order: the context's whole blocks computed once into a KV cache,
    then each block holding continuation tokens fed B times (row j masks its continuation positions at in-block
    offset >= j and reads offset j) against the blocks before it as the text has them, `Student.cached_hidden`
    as the sampler runs it."""
    bs = model.config.block_size
    first = int(block_of(start, bs)) * bs  # the first block that holds a continuation token
    cache = KVCache.for_model(model, 1, len(row))
    last = None
    if first:
        _, last = model.cached_hidden(row[None, :first], cache, commit=first, last_clean=None)
    cache = cache.repeat(bs)
    last = None if last is None else last.expand(bs, -1)
    offset = torch.arange(bs, device=row.device)
    out = []
    for lo in range(first, len(row), bs):
        here = cont[lo : lo + bs]  # (bs,)
        if not bool(here.any()):
            break
        x = torch.where(here[None, :] & (offset[None, :] >= offset[:, None]), model.config.mask_id, row[lo : lo + bs])
        done = row[lo - bs : lo] if lo > first else row[lo:lo]  # the block before, committed by this forward
        ids = torch.cat([done.expand(bs, -1), x], dim=1)  # (bs, commit + bs)
        h, last = model.cached_hidden(ids, cache, commit=len(done), last_clean=last)  # (bs, bs, H)
        read = here[None, :] & (offset[None, :] == offset[:, None])  # (bs, bs): row j reads offset j
        out.append(model.logits(h[read]))  # in offset order within the block
    return torch.cat(out)


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
