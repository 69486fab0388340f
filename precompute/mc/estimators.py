"""Monte Carlo completion targets (docs/design.md §4): the estimators over the K completions (particles) of each row.

For a row x with masked positions M (visible tokens V = the rest), K completions z^(1..K) are drawn left to
right (`particles`: x_j ~ p_T(.|x_<j) at a masked j, the row's token at a visible j). The target at a masked
position i is

    q̂(v) = Σ_k w_k · score_k(v)

- score "next-token" (§4's formula): p_T(v | x_<i^(k)), read off while sampling, so it is free;
- score "full-conditional": P_T(x_i = v | every other token of completion k), top-K rescoring of the completed
  sequence (the topk mode's computation), which is what makes the estimate look to the right;
- weights "uniform": 1/K (plain Monte Carlo);
- weights "importance": self-normalised w_k ∝ Π_{j ∈ V, j > first masked} p_T(x_j | x_<j^(k)) (times the
  proposal correction p_T/p_T^τ for the sampled tokens when τ != 1): the sampler never looks at the visible
  tokens to its right; these weights make the estimate consistent for the posterior (docs/mc.md derives it).
- weights "smc": the same weights, accumulated run by run, with resampling between runs when the effective
  sample size falls below ``smc_ess · K`` (`particles.resample`); the scores recorded earlier follow their
  particle's ancestry. Same limits as "importance"; resampling spends the samples on the completions the visible
  tokens support.

Both backends end here: the torch backend through `mc_targets`, vLLM through `VllmTeacher.mc_batch`. Block rows
(``--block-size``) are one problem per block (`by_block`): a block's masked positions are completed given the
clean blocks before it and its own visible tokens, the rows cut at the block's end.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ar2mdm.precompute.decode import Decoder, decoder_for, encode
from ar2mdm.precompute.forward import check_finite
from ar2mdm.precompute.mc.particles import McSettings, sample_particles
from ar2mdm.precompute.topk import rescore
from ar2mdm.precompute.tree import TorchScorer
from ar2mdm.shared.blocks import right_context
from ar2mdm.shared.masking import row_seed
from ar2mdm.student.blocks import block_of


@dataclass
class McTargets:
    ids: list[torch.Tensor]  # per masked position (ascending): the entries' ids, most probable first
    logprobs: list[torch.Tensor]  # per masked position: their log-probs
    ess: float  # of the final weights
    particles: int  # K
    ess_before: list[float] = field(default_factory=list)  # smc: the ESS at each resampling, before it


def final_weights(logw: torch.Tensor, weights: str) -> torch.Tensor:
    """(R, K) float64 normalised weights from log-weights (R, K): uniform, or their softmax (importance, smc)."""
    if weights == "uniform":
        return torch.full_like(logw, 1.0 / logw.shape[-1], dtype=torch.float64)
    return torch.softmax(logw.double(), dim=-1)


def mixture(ids: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k w_k · score_k for B positions at once, as sparse (ids, log-probs), the top_n most probable first.

    ids, probs: (B, K, m) each particle's sparse scores (probs 0 on unused entries); w: (B, K) weights summing to
    1. Returns ids (B, n) long and log-probs (B, n) float64, n = min(top_n, K·m), -inf past a position's last
    entry of positive mass. Ties go to the smaller id."""
    B = ids.shape[0]
    flat_ids = ids.reshape(B, -1).long()  # (B, K·m)
    flat_p = (w[:, :, None].double() * probs.double()).reshape(B, -1)
    sid, order = flat_ids.sort(dim=1, stable=True)
    sp = flat_p.gather(1, order)
    new = torch.ones_like(sid, dtype=torch.bool)
    new[:, 1:] = sid[:, 1:] != sid[:, :-1]
    seg = new.long().cumsum(1) - 1  # (B, K·m): index of each entry's distinct id, in ascending id order
    mass = torch.zeros_like(sp).scatter_add_(1, seg, sp)  # summed per distinct id (exact, no cancellation)
    uniq = torch.zeros_like(sid).scatter_(1, seg, sid)
    mass, pick = mass.sort(dim=1, descending=True, stable=True)
    n = min(top_n, sid.shape[1])
    mass, pick = mass[:, :n], pick[:, :n]
    logp = torch.where(mass > 0, mass.log(), torch.full_like(mass, -float("inf")))
    return uniq.gather(1, pick), logp


def as_targets(mid: torch.Tensor, mlp: torch.Tensor, w: torch.Tensor, ess_before: list[float]) -> McTargets:
    """One row's targets from its mixed ids and log-probs (P, n) (`mixture`): each position's entries of positive
    mass, with the effective sample size of the row's weights w (K,)."""
    mid, mlp = mid.cpu(), mlp.cpu()
    keep = torch.isfinite(mlp)
    return McTargets(
        [mid[p][keep[p]] for p in range(len(mid))],
        [mlp[p][keep[p]] for p in range(len(mid))],
        float(1.0 / (w.double() ** 2).sum()),
        len(w),
        ess_before,
    )


def targets(ids, probs, w: torch.Tensor, top_n: int, ess_before: list[float]) -> McTargets:
    """One row's targets: the mixture at each of its P masked positions. ids, probs: (P, K, m); w: (K,)."""
    return as_targets(*mixture(ids, probs, w.expand(ids.shape[0], -1), top_n), w, ess_before)


def distinct_branches(seqs: list[list[int]], masked: list[int], window: int | None):
    """Which (completion, masked position) pairs a full-conditional score must compute.

    The score at position i of completion k reads only its tokens x_<=i+n (n = `right_context`), so completions that
    agree there (resampled particles share their ancestry; a confident teacher draws the same tokens) share it.
    Returns (rows, positions, where): rows[j] is a completion index, positions[j] its positions to score, and
    where[p][k] = (j, index in positions[j]) for masked position p of completion k.
    """
    L = len(seqs[0])
    rows, positions, where, seen, row_of = [], [], [[None] * len(seqs) for _ in masked], {}, {}
    for k, x in enumerate(seqs):
        for p, i in enumerate(masked):
            key = (i, tuple(x[: i + right_context(i, L, window, None) + 1]))
            if key not in seen:
                if k not in row_of:
                    row_of[k] = len(rows)
                    rows.append(k)
                    positions.append([])
                j = row_of[k]
                seen[key] = (j, len(positions[j]))
                positions[j].append(i)
            where[p][k] = seen[key]
    return rows, positions, where


def pooled_branches(seqs_per_row: list[list[list[int]]], masked_per_row: list[list[int]], window: int | None):
    """`distinct_branches` of several rows' completions pooled for one rescoring call.

    Returns (seqs, positions, wheres): the pooled completions and their positions to score, and per row its
    ``where`` (see `distinct_branches`), indexing the pooled lists."""
    seqs, positions, wheres = [], [], []
    for row_seqs, masked in zip(seqs_per_row, masked_per_row):
        rows, pos, where = distinct_branches(row_seqs, masked, window)
        wheres.append([[(j + len(seqs), q) for j, q in per_k] for per_k in where])
        seqs += [row_seqs[k] for k in rows]
        positions += pos
    return seqs, positions, wheres


def full_conditional_scores(res, where) -> tuple[torch.Tensor, torch.Tensor]:
    """Rescoring results of the distinct branches -> one row's scores: ids (P, K, R+1), probs (P, K, R+1)."""
    cand = torch.stack([torch.stack([res[j][0][q] for j, q in per_k]) for per_k in where])
    prob = torch.stack([torch.stack([res[j][1][q] for j, q in per_k]) for per_k in where]).exp().double()
    return cand, prob  # probs 0 on invalid slots (log-prob -inf)


def full_conditional_targets(
    rescore_rows, seqs, masks, w: torch.Tensor, s: McSettings, *, ess_before
) -> list[McTargets]:
    """Every row's distinct branches rescored in one call, then each row's mixture.

    rescore_rows(seqs, positions) -> per sequence (cand (P, R+1), logq (P, R+1)): the backend's top-K rescoring.
    seqs: per row its K completions (lists); masks: per row its masked positions; w: (R, K) final weights."""
    flat, positions, wheres = pooled_branches(seqs, masks, s.window)
    res = rescore_rows(flat, positions)
    return [
        targets(*full_conditional_scores(res, where), w[r].cpu(), s.top_n, ess_before[r])
        for r, where in enumerate(wheres)
    ]


def join_blocks(parts: list[McTargets]) -> McTargets:
    """One row's targets from those of its blocks, in block order: the positions one after another, the ESS the
    mean of the blocks' (a row of no masked block, none)."""
    return McTargets(
        [i for t in parts for i in t.ids],
        [lp for t in parts for lp in t.logprobs],
        float(np.mean([t.ess for t in parts])) if parts else float("nan"),
        parts[0].particles if parts else 0,
        [e for t in parts for e in t.ess_before],
    )


def by_block(run, xs, masks: list[np.ndarray], seeds: list[int], block_size: int) -> list[McTargets]:
    """MC targets of block rows: for each block b, the rows with a masked position in it, cut at its end, with
    only its masked positions, through ``run(rows, xs[rows, :end], their masks in b, their seeds)`` (one backend
    call per block: the rows of a call are equally long), then each row's blocks joined (`join_blocks`). The blocks
    before b are the clean tokens, whatever their own masks. A block draws from its row's seed and its index."""
    parts: list[list[McTargets]] = [[] for _ in masks]
    for lo in range(0, xs.shape[1], block_size):
        hi = lo + block_size
        inside = [m[(m >= lo) & (m < hi)] for m in masks]
        rows = [r for r, m in enumerate(inside) if len(m)]
        if not rows:
            continue
        sub_seeds = [row_seed(seeds[r], f"block{block_of(lo, block_size)}") for r in rows]
        for r, t in zip(rows, run(rows, xs[rows, :hi], [inside[r] for r in rows], sub_seeds)):
            parts[r].append(t)
    return [join_blocks(p) for p in parts]


@torch.no_grad()
def mc_targets(
    model,
    xs: torch.Tensor,
    masks: list[np.ndarray],
    seeds: list[int],
    s: McSettings,
    *,
    block_size: int | None = None,
    on_step: Callable[[int], None] | None = None,
    decoder: Decoder | None = None,
) -> list[McTargets]:
    """The MC soft targets of the rows ``xs`` (R, L) at their masked positions, on a transformers causal LM
    (through ``decoder``, default `decode.decoder_for` the model). ``block_size``: per block (`by_block`); the
    clean rows are encoded once and every block's particles start from their prefix of them."""
    masks = [np.asarray(m, dtype=np.int64) for m in masks]
    decoder = decoder or decoder_for(model, xs.shape[1])
    if block_size is None:
        return _row_targets(model, decoder, xs, masks, seeds, s=s, on_step=on_step)
    clean = encode(model, xs)

    def run(rows, sub, sub_masks, sub_seeds):
        prefix = (clean, torch.tensor(rows, device=xs.device))
        return _row_targets(model, decoder, sub, sub_masks, sub_seeds, s=s, on_step=on_step, prefix=prefix)

    return by_block(run, xs, masks, seeds, block_size)


def _row_targets(model, decoder, xs, masks, seeds, *, s: McSettings, on_step=None, prefix=None) -> list[McTargets]:
    """`mc_targets` of whole rows (``prefix``: see `particles.sample_particles`)."""
    p = sample_particles(decoder, xs, masks, seeds, s, on_step=on_step, prefix=prefix)
    R, K = p.logw.shape
    w = final_weights(p.logw, s.weights)  # (R, K)
    check_finite(p.logw.sum() + p.top_probs.sum(), "mc log-probs")  # the batch's one sync before the copies
    ess_at = p.ess_at.cpu().numpy()  # the one host copy of the sampler's bookkeeping
    ess_before = [[float(e) for e in row[~np.isnan(row)]] for row in ess_at]
    if s.score == "full-conditional":
        scorer = TorchScorer(model, s.token_budget)

        def rescore_rows(flat, positions):
            x = torch.tensor(flat, dtype=torch.long)
            pos = [torch.tensor(q, dtype=torch.long) for q in positions]
            return rescore(scorer, x, pos, k=s.rescore_k, window=s.window)

        seqs = p.seqs.view(R, K, -1).tolist()
        return full_conditional_targets(rescore_rows, seqs, [m.tolist() for m in masks], w, s, ess_before=ess_before)
    # next-token: every row's recorded scores mixed in one call: (R·M, K, m) positions by slot
    M, m = p.top_ids.shape[1:]
    ids = p.top_ids.view(R, K, M, m).transpose(1, 2).reshape(R * M, K, m)
    probs = p.top_probs.view(R, K, M, m).transpose(1, 2).reshape(R * M, K, m)
    mid, mlp = mixture(ids, probs, w.repeat_interleave(M, 0), s.top_n)
    mid, mlp = mid.view(R, M, -1).cpu(), mlp.view(R, M, -1).cpu()
    return [as_targets(mid[r, : len(mk)], mlp[r, : len(mk)], w[r], ess_before[r]) for r, mk in enumerate(masks)]
