"""Monte Carlo targets of several rows at once on the torch backend: all rows' K samples in one forward.

`mc.sample_completions` grows the K samples of one row, prefilling each visible run in one forward: few, small
forwards, which leave a GPU idle at K = 8. Here the R rows of a batch advance in lockstep, one position per
step, as R·K sequences in one KV cache: rows are all L tokens long, so no padding and no position ids are
needed. At position j a sequence whose row has j masked samples it (from its row's generator); every other
sequence is fed its row's token. Each row keeps the random draws, weights and resampling of
`sample_completions` in the same order, so the two agree draw for draw (up to floating-point differences of
the batched forward; `tests/precompute/test_mc_rows.py`).

Cost: the same teacher tokens as row by row (K·(L - p0) + R·p0 for the shortest shared prefix p0), in
L - p0 forwards of R·K sequences instead of R·(masked + visible runs) forwards of K.
"""

from __future__ import annotations

import torch

from ar2mdm.precompute.mc import (
    Completions,
    McTargets,
    _logits,
    combine,
    ess,
    final_weights,
    full_conditional_per_position,
    next_token_keep,
    pooled_branches,
    resample_due,
    systematic_resample,
    top_probs,
)
from ar2mdm.precompute.rescoring import rescore


@torch.no_grad()
def sample_completions_rows(
    model,
    xs: torch.Tensor,
    masked: list[list[int]],
    K: int,
    temperature: float,
    generators: list[torch.Generator],
    keep: int = 64,
    smc_ess: float = 0.0,
) -> list[Completions]:
    """`mc.sample_completions` for each row of ``xs`` (R, L), every row's K samples in one batch."""
    from transformers import DynamicCache

    R, L = xs.shape
    dev = xs.device
    msets = [set(m) for m in masked]
    firsts = [m[0] for m in masked]
    p0 = min(firsts)
    seqs = xs.repeat_interleave(K, 0)  # (R·K, L), row r's samples at r·K .. r·K+K-1
    logw = torch.zeros(R, K, dtype=torch.float64)
    next_ids = [[] for _ in range(R)]
    next_probs = [[] for _ in range(R)]
    ess_before = [[] for _ in range(R)]
    cache = DynamicCache()
    last = _logits(model, xs[:, :p0], cache)[:, -1]  # (R, V): the shortest shared prefix, once per row
    cache.batch_repeat_interleave(K)
    last = last.repeat_interleave(K, 0)  # (R·K, V)
    for pos in range(p0, L):
        lp1 = torch.log_softmax(last, dim=-1)  # (R·K, V) p_T(.|x_<pos) at T = 1
        order = None  # a resampling of some rows: the new ancestor of every sequence
        for r in range(R):
            if pos < firsts[r]:
                continue  # the row's own prefix: fed, not weighed
            sl = slice(r * K, (r + 1) * K)
            if pos in msets[r]:
                ids, probs = top_probs(lp1[sl], keep)
                next_ids[r].append(ids)
                next_probs[r].append(probs)
                lpt = lp1[sl] if temperature == 1.0 else torch.log_softmax(last[sl] / temperature, dim=-1)
                z = torch.multinomial(lpt.exp(), 1, generator=generators[r])[:, 0]  # (K,)
                if temperature != 1.0:  # proposal correction: target p_T, proposal p_T^τ
                    logw[r] += (lp1[sl].gather(1, z[:, None]) - lpt.gather(1, z[:, None]))[:, 0].double().cpu()
                seqs[sl, pos] = z
                continue
            logw[r] += lp1[sl].gather(1, seqs[sl, pos : pos + 1])[:, 0].double().cpu()
            # the end of a visible run with a masked position next: resample if due (as sample_completions)
            if pos + 1 < L and pos + 1 in msets[r] and resample_due(logw[r], smc_ess):
                ess_before[r].append(ess(logw[r]))
                g = generators[r]
                a = systematic_resample(logw[r], float(torch.rand(1, generator=g, device=g.device)))  # (K,)
                order = torch.arange(R * K) if order is None else order
                order[sl] = r * K + a
                next_ids[r] = [t[a] for t in next_ids[r]]  # the recorded scores follow their particle's ancestry
                next_probs[r] = [t[a] for t in next_probs[r]]
                logw[r] = 0.0
        if order is not None:
            seqs = seqs[order.to(dev)]
            cache.reorder_cache(order.to(dev))
        if pos + 1 < L:
            last = _logits(model, seqs[:, pos : pos + 1], cache)[:, -1]
    return [
        Completions(seqs[r * K : (r + 1) * K], logw[r].clone(), next_ids[r], next_probs[r], ess_before[r])
        for r in range(R)
    ]


@torch.no_grad()
def mc_targets_rows(
    model,
    xs: torch.Tensor,
    masked: list[list[int]],
    K: int,
    score: str,
    weights: str,
    temperature: float,
    generators: list[torch.Generator],
    top_n: int,
    rescore_k: int = 8,
    window: int | None = None,
    token_budget: int = 4096,
    smc_ess: float = 0.5,
) -> list[McTargets]:
    """`mc.mc_targets` for each row of ``xs`` (R, L); the full-conditional rescoring of every row in one call."""
    if score not in ("next-token", "full-conditional"):
        raise ValueError(f"score must be next-token or full-conditional, got {score!r}")
    comps = sample_completions_rows(
        model,
        xs,
        masked,
        K,
        temperature,
        generators,
        keep=next_token_keep(top_n),
        smc_ess=smc_ess if weights == "smc" else 0.0,
    )
    if score == "next-token":
        per_row = [list(zip(c.next_ids, c.next_probs)) for c in comps]
    else:
        seqs, positions, wheres = pooled_branches([c.seqs.tolist() for c in comps], masked, window)
        res = rescore(
            model,
            torch.tensor(seqs, dtype=torch.long, device=xs.device),
            [torch.tensor(p, dtype=torch.long) for p in positions],
            rescore_k,
            window,
            token_budget,
        )
        per_row = [full_conditional_per_position(res, where) for where in wheres]
    return [combine(pp, final_weights(c.logw, weights), top_n, c.ess_before) for c, pp in zip(comps, per_row)]
