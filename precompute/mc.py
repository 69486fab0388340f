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

Cost: the prefix before the first masked position is computed once and its KV cache shared by the K samples;
each visible run is one prefill for all K samples; each masked position is one decode step for all K.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ar2mdm.precompute.rescoring import rescore


@dataclass
class Completions:
    seqs: torch.Tensor  # (K, L) long: the completed sequences
    logw: torch.Tensor  # (K,) float64: unnormalised log importance weights
    next_ids: list[torch.Tensor]  # per masked position (ascending): (K, m) ids of p_T(.|x_<i^(k)), top-m
    next_probs: list[torch.Tensor]  # per masked position: (K, m) their probabilities at T = 1


def _top(lp: torch.Tensor, m: int) -> tuple[torch.Tensor, torch.Tensor]:
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
    model, x: torch.Tensor, masked: list[int], K: int, temperature: float, generator: torch.Generator, keep: int = 64
) -> Completions:
    """K completions of row ``x`` (L,) with the positions ``masked`` (ascending, all >= 1) sampled.

    keep: entries of each next-token distribution kept for the mixture (the rest of its mass is dropped, so
    stored sums stay <= 1).
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
    next_ids, next_probs = [], []
    pos = first
    while pos < L:
        lp1 = torch.log_softmax(last, dim=-1)  # (K, V) p_T(.|x_<pos) at T = 1
        if pos in mset:
            ids, probs = _top(lp1, keep)
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
        pos = end
    return Completions(seqs, logw, next_ids, next_probs)


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
    ess: float
    samples: int


def rescored_per_position(res: list[tuple[torch.Tensor, torch.Tensor]], P: int):
    """Rescoring results of the K completions -> per masked position (ids (K, R+1), probs (K, R+1))."""
    cand = torch.stack([c for c, _ in res])  # (K, P, R+1)
    prob = torch.stack([lq for _, lq in res]).exp().double()  # (K, P, R+1), 0 on invalid slots
    return [(cand[:, p], prob[:, p]) for p in range(P)]


def combine(per_pos, w: torch.Tensor, top_n: int) -> McTargets:
    """The weighted mixture at every masked position, with the effective sample size of the weights."""
    out_ids, out_lp = [], []
    for ids, probs in per_pos:
        i, lp = mixture(ids, probs, w, top_n)
        out_ids.append(i)
        out_lp.append(lp)
    return McTargets(out_ids, out_lp, float(1.0 / (w**2).sum()), len(w))


@torch.no_grad()
def mc_targets(
    model, x: torch.Tensor, masked: list[int], K: int, score: str, weights: str, temperature: float,
    generator: torch.Generator, top_n: int, rescore_k: int = 8, window: int | None = None,
    token_budget: int = 4096,
) -> McTargets:
    """The MC soft targets of one row at its masked positions (see the module docstring)."""
    comp = sample_completions(model, x, masked, K, temperature, generator, keep=next_token_keep(top_n))
    if weights == "importance":
        w = torch.softmax(comp.logw, dim=0)
    elif weights == "uniform":
        w = torch.full((K,), 1.0 / K, dtype=torch.float64)
    else:
        raise ValueError(f"weights must be uniform or importance, got {weights!r}")
    if score == "next-token":
        per_pos = list(zip(comp.next_ids, comp.next_probs))
    elif score == "full-conditional":
        pos = torch.tensor(masked, dtype=torch.long)
        res = rescore(model, comp.seqs, [pos] * K, rescore_k, window, token_budget)
        per_pos = rescored_per_position(res, len(masked))
    else:
        raise ValueError(f"score must be next-token or full-conditional, got {score!r}")
    return combine(per_pos, w, top_n)


@torch.no_grad()
def sample_completions_naive(model, x: torch.Tensor, masked: list[int], K: int, temperature: float, generator) -> torch.Tensor:
    """The baseline for the benchmark: one sample at a time, a full forward (no cache) per masked position."""
    out = x.repeat(K, 1)
    for k in range(K):
        for j in masked:
            logits = model(input_ids=out[k : k + 1, :j]).logits[0, -1].float()
            out[k, j] = torch.multinomial(torch.softmax(logits / temperature, -1), 1, generator=generator)[0]
    return out
