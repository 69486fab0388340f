"""Monte Carlo completion targets (seed §4), on a transformers causal LM.

For a row x with masked positions M (visible tokens V = the rest), K completions z^(1..K) are drawn left to
right: at a masked position j, x_j ~ p_T(.|x_<j) (at the sampling temperature), at a visible position the row's
token is kept. The target at a masked position i is

    q̂(v) = Σ_k w_k · score_k(v)

- score "next-token" (the seed's formula): p_T(v | x_<i^(k)), read off while sampling, so it is free;
- score "full-conditional": P_T(x_i = v | every other token of completion k), top-K rescoring of the completed
  sequence (the topk mode's computation), which is what makes the estimate look to the right;
- weights "uniform": 1/K (the seed);
- weights "importance": self-normalised w_k ∝ Π_{j ∈ V, j > first masked} p_T(x_j | x_<j^(k)) (times the
  proposal correction p_T/p_T^τ for the sampled tokens when τ != 1): the sampler never looks at the visible
  tokens to its right; these weights make the estimate consistent for the posterior (docs/mc.md derives it).
- weights "smc": the same weights, but accumulated run by run; after a visible run, when the effective sample
  size of the weights falls below ``smc_ess · K`` (and a masked position is still ahead), the K particles are
  resampled (systematic resampling, from the row's generator), their KV cache reordered with them and their
  weights reset. The next-token scores recorded earlier follow their particle's ancestry. Same limits as
  "importance"; resampling spends the samples on the completions the visible tokens support.

Cost: the prefix before the first masked position is computed once and its KV cache shared by the K samples;
each visible run is one prefill for all K samples; each masked position is one decode step for all K.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ar2mdm.precompute.rescoring import rescore


@dataclass
class Completions:
    seqs: torch.Tensor  # (K, L) long: the completed sequences
    logw: torch.Tensor  # (K,) float64: unnormalised log importance weights (since the last resampling)
    next_ids: list[torch.Tensor]  # per masked position (ascending): (K, m) ids of p_T(.|x_<i^(k)), top-m
    next_probs: list[torch.Tensor]  # per masked position: (K, m) their probabilities at T = 1
    ess_before: list[float] = field(default_factory=list)  # the ESS at each resampling, before it


def ess(logw: torch.Tensor) -> float:
    """Effective sample size 1/Σ w_k² of self-normalised weights with log-weights ``logw`` (K,)."""
    w = torch.softmax(logw.double(), dim=0)
    return float(1.0 / (w**2).sum())


def systematic_resample(logw: torch.Tensor, u0: float) -> torch.Tensor:
    """Ancestor indices (K,) long for weights softmax(logw), by systematic resampling with offset u0 in [0, 1).

    Particle k is copied ⌊K·w_k⌋ or ⌈K·w_k⌉ times (the lowest-variance of the standard schemes), in order.
    """
    w = torch.softmax(logw.double(), dim=0)  # (K,)
    K = len(w)
    cdf = torch.cumsum(w, 0)
    u = (u0 + torch.arange(K, dtype=torch.float64)) / K  # (K,) one stratum each
    return torch.searchsorted(cdf, u, right=True).clamp_(max=K - 1)


def resample_due(logw: torch.Tensor, smc_ess: float) -> bool:
    """Whether the particles are resampled: ESS < smc_ess · K (0 never; 1 whenever the weights differ)."""
    K = len(logw)
    return smc_ess > 0 and ess(logw) < smc_ess * K * (1 - 1e-9)


def top_probs(lp: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, probs) of the m most probable entries of (K, V) log-probs."""
    v, i = lp.topk(min(m, lp.shape[-1]), dim=-1)
    return i.cpu(), v.exp().double().cpu()


def _cache_arg(model) -> str:
    # transformers renamed `past_key_values` to `cache` (5.x); pass whichever this version's forward takes
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _logits(model, ids: torch.Tensor, cache) -> torch.Tensor:
    out = model(input_ids=ids, use_cache=True, **{_cache_arg(model): cache})
    return out.logits.float()  # (K, n, V)


@torch.no_grad()
def sample_completions(
    model,
    x: torch.Tensor,
    masked: list[int],
    K: int,
    temperature: float,
    generator: torch.Generator,
    keep: int = 64,
    smc_ess: float = 0.0,
) -> Completions:
    """K completions of row ``x`` (L,) with the positions ``masked`` (ascending, all >= 1) sampled.

    keep: entries of each next-token distribution kept for the mixture (the rest of its mass is dropped, so
    stored sums stay <= 1). smc_ess: resample after a visible run when ESS < smc_ess · K (0: never, which is
    plain importance sampling with the same random draws).
    """
    from transformers import DynamicCache

    L = x.shape[0]
    dev = x.device
    mset = set(masked)
    first = masked[0]
    seqs = x.repeat(K, 1)  # (K, L)
    logw = torch.zeros(K, dtype=torch.float64)
    cache = DynamicCache()
    last = _logits(model, x[None, :first], cache)[:, -1]  # (1, V): the shared prefix, computed once
    cache.batch_repeat_interleave(K)
    last = last.expand(K, -1)  # (K, V)
    next_ids, next_probs, ess_before = [], [], []
    pos = first
    while pos < L:
        lp1 = torch.log_softmax(last, dim=-1)  # (K, V) p_T(.|x_<pos) at T = 1
        if pos in mset:
            ids, probs = top_probs(lp1, keep)
            next_ids.append(ids)
            next_probs.append(probs)
            lpt = lp1 if temperature == 1.0 else torch.log_softmax(last / temperature, dim=-1)
            z = torch.multinomial(lpt.exp(), 1, generator=generator)[:, 0]  # (K,)
            if temperature != 1.0:  # proposal correction: target p_T, proposal p_T^τ
                logw += (lp1.gather(1, z[:, None]) - lpt.gather(1, z[:, None]))[:, 0].double().cpu()
            seqs[:, pos] = z
            if pos + 1 < L:
                last = _logits(model, z[:, None], cache)[:, -1]
            pos += 1
            continue
        end = pos
        while end < L and end not in mset:
            end += 1
        run = seqs[:, pos:end]  # (K, n) visible tokens, the same for every sample
        logw += lp1.gather(1, run[:, :1])[:, 0].double().cpu()
        if end < L or end - pos > 1:
            out = _logits(model, run, cache)  # one prefill for the whole visible run
            if end - pos > 1:
                lps = torch.log_softmax(out[:, :-1], dim=-1)  # (K, n-1, V)
                logw += lps.gather(2, run[:, 1:, None])[..., 0].sum(1).double().cpu()
            last = out[:, -1]
        if end < L and resample_due(logw, smc_ess):  # a masked position is ahead: spend samples where w is
            ess_before.append(ess(logw))
            u0 = float(torch.rand(1, generator=generator, device=generator.device))
            a = systematic_resample(logw, u0)  # (K,) ancestors
            seqs, last = seqs[a.to(dev)], last[a.to(last.device)]
            cache.reorder_cache(a.to(dev))
            next_ids = [t[a] for t in next_ids]  # the recorded scores follow their particle's ancestry
            next_probs = [t[a] for t in next_probs]
            logw = torch.zeros(K, dtype=torch.float64)
        pos = end
    return Completions(seqs, logw, next_ids, next_probs, ess_before)


def next_token_keep(top_n: int) -> int:
    """Entries of each next-token distribution kept for the mixture: the same on every backend."""
    return max(64, 4 * top_n)


def mixture(ids: torch.Tensor, probs: torch.Tensor, w: torch.Tensor, top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Σ_k w_k · score_k as sparse (ids, log-probs), top_n most probable first.

    ids, probs: (K, m) sparse scores (probs 0 on unused entries); w: (K,) weights summing to 1.
    """
    flat_ids = ids.reshape(-1)
    flat_p = (w[:, None].double() * probs.double()).reshape(-1)
    uniq, inv = torch.unique(flat_ids, return_inverse=True)
    mass = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, flat_p)
    keep = mass > 0
    uniq, mass = uniq[keep], mass[keep]
    order = torch.argsort(mass, descending=True, stable=True)[:top_n]
    return uniq[order], mass[order].log()


@dataclass
class McTargets:
    ids: list[torch.Tensor]  # per masked position
    logprobs: list[torch.Tensor]
    ess: float  # of the final weights
    samples: int
    ess_before: list[float] = field(default_factory=list)  # smc: the ESS at each resampling, before it


def distinct_branches(seqs: list[list[int]], masked: list[int], window: int | None):
    """Which (completion, masked position) pairs a full-conditional score must compute.

    The score at position i of completion k reads only its tokens x_<=i+n (n = the window), so completions that
    agree there (resampled particles share their ancestry; a confident teacher draws the same tokens) share it.
    Returns (rows, positions, where): rows[j] is a completion index, positions[j] its positions to score, and
    where[p][k] = (j, index in positions[j]) for masked position p of completion k.
    """
    L = len(seqs[0])
    rows, positions, where, seen, row_of = [], [], [[None] * len(seqs) for _ in masked], {}, {}
    for k, x in enumerate(seqs):
        for p, i in enumerate(masked):
            n = L - 1 - i if window is None else min(L - 1 - i, window)
            key = (i, tuple(x[: i + n + 1]))
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


def full_conditional_per_position(res, where) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rescoring results of the distinct branches -> per masked position (ids (K, R+1), probs (K, R+1))."""
    out = []
    for per_k in where:
        cand = torch.stack([res[j][0][q] for j, q in per_k])  # (K, R+1)
        prob = torch.stack([res[j][1][q] for j, q in per_k]).exp().double()  # (K, R+1), 0 on invalid slots
        out.append((cand, prob))
    return out


def combine(per_pos, w: torch.Tensor, top_n: int, ess_before=()) -> McTargets:
    """The weighted mixture at every masked position, with the effective sample size of the weights."""
    out_ids, out_lp = [], []
    for ids, probs in per_pos:
        i, lp = mixture(ids, probs, w, top_n)
        out_ids.append(i)
        out_lp.append(lp)
    return McTargets(out_ids, out_lp, float(1.0 / (w**2).sum()), len(w), list(ess_before))


def final_weights(logw: torch.Tensor, weights: str) -> torch.Tensor:
    """(K,) float64 normalised weights: uniform, or softmax of the log-weights (importance, smc)."""
    if weights == "uniform":
        return torch.full((len(logw),), 1.0 / len(logw), dtype=torch.float64)
    if weights in ("importance", "smc"):
        return torch.softmax(logw.double(), dim=0)
    raise ValueError(f"weights must be uniform, importance or smc, got {weights!r}")


@torch.no_grad()
def mc_targets(
    model,
    x: torch.Tensor,
    masked: list[int],
    K: int,
    score: str,
    weights: str,
    temperature: float,
    generator: torch.Generator,
    top_n: int,
    rescore_k: int = 8,
    window: int | None = None,
    token_budget: int = 4096,
    smc_ess: float = 0.5,
) -> McTargets:
    """The MC soft targets of one row at its masked positions (see the module docstring)."""
    comp = sample_completions(
        model,
        x,
        masked,
        K,
        temperature,
        generator,
        keep=next_token_keep(top_n),
        smc_ess=smc_ess if weights == "smc" else 0.0,
    )
    w = final_weights(comp.logw, weights)
    if score == "next-token":
        per_pos = list(zip(comp.next_ids, comp.next_probs))
    elif score == "full-conditional":
        rows, positions, where = distinct_branches(comp.seqs.tolist(), masked, window)
        pos = [torch.tensor(p, dtype=torch.long) for p in positions]
        res = rescore(model, comp.seqs[rows], pos, rescore_k, window, token_budget)
        per_pos = full_conditional_per_position(res, where)
    else:
        raise ValueError(f"score must be next-token or full-conditional, got {score!r}")
    return combine(per_pos, w, top_n, comp.ess_before)


@torch.no_grad()
def sample_completions_naive(
    model, x: torch.Tensor, masked: list[int], K: int, temperature: float, generator
) -> torch.Tensor:
    """The baseline for the benchmark: one sample at a time, a full forward (no cache) per masked position."""
    out = x.repeat(K, 1)
    for k in range(K):
        for j in masked:
            logits = model(input_ids=out[k : k + 1, :j]).logits[0, -1].float()
            out[k, j] = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[0]
    return out
