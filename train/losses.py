"""Losses of seed sections 1-2 as pure tensor functions.

Shapes: B rows, L positions, V vocabulary, N stored target entries per position. Every function takes the
student's log-probabilities only at the positions that carry a loss (``K`` of them, gathered from (B, L, V)),
so that the V-sized work is proportional to the masked positions, and the log-softmax is computed once and
shared by the MDM and KD terms when T = 1 (`student_logprobs`).
"""

from __future__ import annotations

import torch

NEG_INF = float("-inf")


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits under autocast), float64 stays float64 (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def corrupt(input_ids: torch.Tensor, mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t: (B, L) ids with the masked positions replaced by the mask token."""
    return torch.where(mask, torch.full_like(input_ids, mask_id), input_ids)


def row_norm(prompt_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,) the seed's normaliser: L for pretrain rows (prompt_len 0), |response| = L - prompt_len for SFT rows."""
    return torch.where(prompt_len > 0, seq_len - prompt_len, torch.full_like(prompt_len, seq_len)).float()


def student_logprobs(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(z / T) over the vocabulary: (K, V) logits -> (K, V) log-probs, at least float32."""
    z = _up(logits)
    return torch.log_softmax(z if temperature == 1.0 else z / temperature, dim=-1)


def mdm_loss(
    logp: torch.Tensor, targets: torch.Tensor, row: torch.Tensor, norm: torch.Tensor, weight: torch.Tensor
) -> torch.Tensor:
    """Seed §1: mean over rows of -(1/norm_b) · weight_b · Σ_{i masked in b} log p_θ(x_0,i | x_t).

    logp: (K, V) student log-probs (T = 1) at the masked positions; targets: (K,) clean tokens; row: (K,) row
    of each position; norm: (B,) L for pretrain rows, the response length for SFT rows; weight: (B,) 1, or 1/t.
    """
    nll = -logp.gather(1, targets[:, None])[:, 0]  # (K,)
    per_row = torch.zeros_like(norm, dtype=nll.dtype).index_add(0, row, nll)  # (B,)
    return (per_row * weight / norm).mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012)."""
    x = x.clamp(max=-1e-12)
    return torch.where(x > -0.6931, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def sparse_kl(
    logp: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor, temperature: float, tail: str
) -> torch.Tensor:
    """Per-position T²·KL(q_T ‖ p_θ^T) against a sparse stored target.

    logp: (K, V) student log-probs at temperature T (`student_logprobs(logits, T)`); target_ids: (K, N) ids; target_logprobs: (K, N) stored log q at T=1,
    -inf on padding entries; exp sums to <= 1 (the rest is mass outside the stored support).
    q_T: the stored target raised to 1/T and renormalised over its support; p_θ^T = softmax(z/T) over V.
    tail="renormalize": the support is treated as the whole distribution.
    tail="bucket": one more category holds the leftover mass, tempered like the others, against the student's
    own leftover mass 1 - Σ_{v∈S} p_θ^T(v).
    Returns (K,) in logp's dtype.
    """
    T = float(temperature)
    valid = torch.isfinite(target_logprobs)  # (K, N)
    logp_s = logp.gather(1, target_ids.clamp(min=0).long())  # (K, N)
    target_logprobs = target_logprobs.to(logp.dtype)
    scaled = target_logprobs / T  # log q^(1/T), -inf on padding
    if tail == "renormalize":
        logq = torch.log_softmax(scaled, dim=-1)  # (K, N)
        q = logq.exp()
        kl = (q * (logq - logp_s)).masked_fill(~valid, 0.0).sum(-1)
    elif tail == "bucket":
        mass = torch.logsumexp(target_logprobs, dim=-1)  # (K,) log Σ q at T=1
        # a leftover below 1e-6 is rounding, not mass: tempering with T > 1 would inflate it into a real category
        tail_lq = torch.where(mass > -1e-6, torch.full_like(mass, NEG_INF), _log1mexp(mass) / T)  # (K,) log q_tail^(1/T)
        allq = torch.cat([scaled, tail_lq[:, None]], dim=-1)  # (K, N+1)
        logq = torch.log_softmax(allq, dim=-1)
        # the student's leftover mass outside the support, from the same tempered distribution
        logp_tail = _log1mexp(torch.logsumexp(logp_s.masked_fill(~valid, NEG_INF), dim=-1))  # (K,)
        logp_all = torch.cat([logp_s, logp_tail[:, None]], dim=-1)
        q = logq.exp()
        ok = torch.cat([valid, torch.isfinite(tail_lq)[:, None]], dim=-1)
        kl = (q * (logq - logp_all)).masked_fill(~ok, 0.0).sum(-1)
    else:
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
    return T * T * kl


def kd_loss(
    logp: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor, row: torch.Tensor,
    norm: torch.Tensor, temperature: float, tail: str = "renormalize",
) -> torch.Tensor:
    """Seed §2: mean over rows of (1/norm_b) Σ_{i masked in b} T²·KL(q_T ‖ p_θ^T); positions without a
    stored target (all entries -inf) contribute 0. logp: (K, V) student log-probs at temperature T."""
    kl = sparse_kl(logp, target_ids, target_logprobs, temperature, tail)  # (K,)
    has = torch.isfinite(target_logprobs).any(-1)
    kl = kl.masked_fill(~has, 0.0)
    per_row = torch.zeros_like(norm, dtype=kl.dtype).index_add(0, row, kl)  # (B,)
    return (per_row / norm).mean()


def combined_loss(mdm: torch.Tensor, kd: torch.Tensor, lam: float) -> torch.Tensor:
    """(1-λ)·L_MDM + λ·L_KD; the unused term is dropped at λ ∈ {0, 1}, so its graph is never built."""
    if lam == 0.0:
        return mdm
    if lam == 1.0:
        return kd
    return (1.0 - lam) * mdm + lam * kd
