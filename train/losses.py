"""Losses of docs/design.md §1–§2 as pure tensor functions.

Shapes: B rows, L positions, V vocabulary, N stored target entries per position. Every function takes the
student's log-probabilities only at the positions that carry a loss (``M`` of them, gathered from (B, L, V)),
so that the V-sized work is proportional to the masked positions; `masked_losses` makes both terms per
position from one log-softmax at T = 1, in chunks of positions, and `mdm_loss` / `kd_loss` sum them by row.
`objective.batch_loss` composes them for one batch: (1-λ)·MDM + λ·KD.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NEG_INF = float("-inf")


def _up(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (bf16 logits under autocast), float64 stays float64 (gradcheck)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def corrupt(input_ids: torch.Tensor, mask: torch.Tensor, mask_id: int) -> torch.Tensor:
    """x_t: (B, L) ids with the masked positions replaced by the mask token."""
    return torch.where(mask, torch.full_like(input_ids, mask_id), input_ids)


def row_norm(prompt_len: torch.Tensor, seq_len: int) -> torch.Tensor:
    """(B,) §1's normaliser: L for pretrain rows (prompt_len 0), |response| = L - prompt_len for SFT rows."""
    return torch.where(prompt_len > 0, seq_len - prompt_len, torch.full_like(prompt_len, seq_len)).float()


def student_logprobs(logits: torch.Tensor) -> torch.Tensor:
    """log softmax(z) over the vocabulary: (M, V) logits -> (M, V) log-probs, at least float32."""
    return torch.log_softmax(_up(logits), dim=-1)


def mdm_loss(
    nll: torch.Tensor, row: torch.Tensor, norm: torch.Tensor, weight: torch.Tensor, by_row: bool = False
) -> torch.Tensor:
    """docs/design.md §1: mean over rows of (1/norm_b) · Σ_{i masked in b} weight_i · -log p_θ(x_0,i | x_t).

    nll: (M,) -log p_θ(x_0,i | x_t) at the masked positions (`masked_losses`); row: (M,) row of each position;
    norm: (B,) L for pretrain rows, the response length for SFT rows; weight: (M,) 1, or 1/t of the position's
    row or block (`elbo_weight`). ``by_row``: the (B,) row terms instead of their mean.
    """
    rows = torch.zeros_like(norm, dtype=nll.dtype).index_add(0, row, nll * weight) / norm  # (B,)
    return rows if by_row else rows.mean()


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x <= 0, stable at both ends (Mächler 2012).

    Each branch gets only inputs it is safe on: `torch.where` differentiates both branches, and the unused
    log1p(-exp(x)) at x ~ -1e-9 (exp rounds to 1) would have an infinite gradient, and 0·inf = NaN.
    """
    x = x.clamp(max=-1e-12)
    near = x > -0.6931  # -log 2
    a = torch.log(-torch.expm1(torch.where(near, x, torch.full_like(x, -1.0))))
    b = torch.log1p(-torch.exp(torch.where(near, torch.full_like(x, -1.0), x)))
    return torch.where(near, a, b)


def storage_slack(target_logprobs: torch.Tensor, logprob_dtype: str) -> torch.Tensor:
    """(M,) the largest leftover mass 1 - Σ_S q that rounding alone can leave at each position.

    Stored log-probs are rounded towards -inf (float16 by default), so a stored q_v is at most
    q_v·(1 - exp(-ulp(log q_v))) below the true one; a leftover below the sum of those bounds is rounding,
    not mass outside the support. target_logprobs: (M, N) as stored, -inf on padding.
    """
    mant = {"float16": 10, "float32": 23}[logprob_dtype]
    lp = target_logprobs.float()
    finite = torch.isfinite(lp)
    mag = lp.abs().masked_fill(~finite, 1.0).clamp(min=2.0**-14)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - mant)  # (M, N) spacing of the stored values
    slack = (lp.exp() * torch.expm1(ulp)).masked_fill(~finite, 0.0).sum(-1)
    return slack + 1e-6  # + float32 summation error of the leftover itself


# Where the student's mass on S is at most this, log p_rest = log(1 - Σ_S p) is off by at most δ·Σ_S p / p_rest
# <= δ, δ being the log-softmax's own normalisation error (|log Σ_V p| reaches 6e-5 in float32 at V = 152k), so
# the KD term is as accurate as the MDM term; above it, the complement is summed (its δ cancels, see below).
COMPLEMENT_MAX_MASS = 0.5


def rest_logmass(
    logp: torch.Tensor,
    ids: torch.Tensor,
    valid: torch.Tensor,
    logp_s: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log Σ_{v∉S} p_θ(v), whether S leaves any of the vocabulary out), both (M,), for the bucket tail.

    logp: (M, V) student log-probs; ids: (M, N) stored ids (any value where not valid); valid: (M, N);
    logp_s: (M, N) = logp.gather(1, ids). Why two routes: summing the complement touches all M·V entries
    (forward and backward, several passes: 3x the KD step's cost, measured), while log(1 - Σ_S p) needs only
    the N stored entries and has the same value and the same gradient with respect to the logits (both are
    log Σ_{v∉S} e^z - log Σ_V e^z). The short route is used where it is accurate: distinct ids, S smaller
    than V, and Σ_S p <= COMPLEMENT_MAX_MASS; the other rows (a confident student, a tiny vocabulary, or
    repeated ids) sum their complement, safely where it is empty (-inf, zero gradient). The summed route
    shares the log-softmax's normalisation error with log p_θ(S), so it cancels when `sparse_kl` renormalises
    over the N+1 categories; 1 - Σ_S p does not share it, hence the cap on Σ_S p.
    """
    M, V = logp.shape
    in_s = torch.logsumexp(logp_s.masked_fill(~valid, NEG_INF), dim=-1)  # (M,) log Σ_S p_θ
    srt = ids.masked_fill(~valid, -1).sort(dim=-1).values  # (M, N) repeated ids would be counted twice
    repeated = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(-1)
    exact = repeated | (valid.sum(-1) >= V) | (in_s > math.log(COMPLEMENT_MAX_MASS))  # (M,)
    out = _log1mexp(in_s)  # (M,) rows routed to `exact` are overwritten below
    has_rest = torch.ones_like(exact)
    if bool(exact.any()):
        r = exact.nonzero()[:, 0]  # (k,)
        sub, v = logp[r], valid[r]  # (k, V), (k, N)
        # padding slots point at the row's first valid id, so the scatter writes -inf only at members of S
        first = ids[r].gather(1, v.to(torch.uint8).argmax(-1, keepdim=True))  # (k, 1)
        rest = sub.scatter(1, torch.where(v, ids[r], first), NEG_INF)  # (k, V) the student outside S
        has = torch.isfinite(rest).any(-1)  # (k,)
        safe = torch.where(has[:, None], rest, sub)  # no logsumexp over only -inf (NaN gradient)
        lr = torch.where(has, torch.logsumexp(safe, dim=-1), torch.full_like(has, NEG_INF, dtype=sub.dtype))
        out = out.index_put((r,), lr)
        has_rest = has_rest.index_put((r,), has)
    return out, has_rest


def sparse_kl(
    logp: torch.Tensor,
    target_ids: torch.Tensor,
    target_logprobs: torch.Tensor,
    temperature: float,
    tail: str,
    *,
    slack: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-position T²·KL(q_T ‖ p_θ^T) against a sparse stored target.

    logp: (M, V) student log-probs at T = 1 (`student_logprobs(logits)`); target_ids: (M, N) ids;
    target_logprobs: (M, N) stored log q at T = 1, -inf on padding; exp sums to <= 1 (the rest, the leftover,
    is the teacher's mass outside the stored support S).

    tail="renormalize": S is treated as the whole target: q_T ∝ q^(1/T) over S; p_θ^T = softmax(z/T) over V.
    tail="bucket": both distributions are first coarse-grained to the N+1 categories S ∪ {rest} at T = 1
    (q_rest = the leftover, p_rest = Σ_{v∉S} p_θ(v)), then tempered alike: π_T(c) ∝ π(c)^(1/T). The target's
    tail is known only as a lump, so this is the one definition both sides can share (docs/design.md).
    A leftover at or below ``slack`` (M,) is rounding, not mass: q_rest = 0 there (``storage_slack``;
    default 1e-6, float32 summation error).
    Positions without any finite entry return 0 with a zero gradient. Returns (M,) in logp's dtype.
    """
    T = float(temperature)
    has = torch.isfinite(target_logprobs).any(-1)  # (M,)
    # safe inputs: a position with no entry gets a dummy one (log q = 0 at slot 0), so that no softmax sees
    # only -inf (NaN in the forward and in the gradient); its KL is zeroed at the end
    lq = target_logprobs.to(logp.dtype)
    dummy = torch.full_like(lq, NEG_INF)
    dummy[:, 0] = 0.0
    lq = torch.where(has[:, None], lq, dummy)  # (M, N)
    valid = torch.isfinite(lq)  # (M, N)
    ids = target_ids.long().masked_fill(~valid, 0)
    logp_s = logp.gather(1, ids)  # (M, N) log p_θ(v), T = 1
    if tail == "renormalize":
        logq = torch.log_softmax(lq / T, dim=-1)  # (M, N)
        logp_t = logp_s if T == 1.0 else logp_s / T - torch.logsumexp(logp / T, dim=-1, keepdim=True)
        kl = (logq.exp() * (logq - logp_t)).masked_fill(~valid, 0.0).sum(-1)
    elif tail == "bucket":
        mass = torch.logsumexp(lq, dim=-1)  # (M,) log Σ_S q
        slack = torch.full_like(mass, 1e-6) if slack is None else slack.to(mass.dtype)
        logp_rest, has_rest = rest_logmass(logp, ids, valid, logp_s)  # (M,), (M,)
        leftover = -torch.expm1(mass)  # (M,) 1 - Σ_S q
        tail_on = (leftover > slack) & has_rest  # (M,)
        tail_lq = torch.where(tail_on, _log1mexp(mass), torch.full_like(mass, NEG_INF))  # (M,) log q_rest
        ok = torch.cat([valid, has_rest[:, None]], dim=-1)  # (M, N+1) categories the student can hold
        a = torch.cat([logp_s, logp_rest[:, None]], dim=-1).masked_fill(~ok, NEG_INF)  # (M, N+1)
        logp_t = a / T - torch.logsumexp(a / T, dim=-1, keepdim=True)
        logq = torch.log_softmax(torch.cat([lq, tail_lq[:, None]], dim=-1) / T, dim=-1)  # (M, N+1)
        qok = torch.cat([valid, tail_on[:, None]], dim=-1)
        kl = (logq.exp() * (logq - logp_t.masked_fill(~ok, 0.0))).masked_fill(~qok, 0.0).sum(-1)
    else:
        raise ValueError(f"tail must be 'renormalize' or 'bucket', got {tail!r}")
    return (T * T * kl).masked_fill(~has, 0.0)


def kd_loss(kl: torch.Tensor, row: torch.Tensor, norm: torch.Tensor, by_row: bool = False) -> torch.Tensor:
    """docs/design.md §2: mean over rows of (1/norm_b) Σ_{i masked in b} T²·KL(q_T ‖ p_θ^T).

    kl: (M,) per-position terms (`masked_losses`; 0 where no target is stored; times λ_i where λ varies);
    row: (M,); norm: (B,). ``by_row``: the (B,) row terms instead of their mean."""
    rows = torch.zeros_like(norm, dtype=kl.dtype).index_add(0, row, kl) / norm  # (B,)
    return rows if by_row else rows.mean()


@dataclass(frozen=True)
class SparseTargets:
    """The stored teacher targets at the M masked positions, and how the KD term reads them (`sparse_kl`)."""

    ids: torch.Tensor  # (M, N)
    logprobs: torch.Tensor  # (M, N) log q at T = 1, -inf on padding
    temperature: float
    tail: str
    slack: torch.Tensor | None = None  # (M,) the leftover that is storage rounding (bucket tail)

    def split(self, size: int) -> list["SparseTargets"]:
        """Consecutive chunks of ``size`` positions."""
        slack = self.slack.split(size) if self.slack is not None else [None] * -(-len(self.ids) // size)
        return [
            SparseTargets(i, lp, self.temperature, self.tail, s)
            for i, lp, s in zip(self.ids.split(size), self.logprobs.split(size), slack)
        ]


# Float32 (positions, V) log-probs made at once by `masked_losses`: 256 MiB, 1,365 positions at V = 49k.
LOSS_CHUNK_BYTES = 1 << 28


def masked_losses(
    logits: torch.Tensor, tokens: torch.Tensor, targets: SparseTargets | None, chunk: int | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(M,) -log p_θ(x_0,i | x_t) and (M,) T²·KL(q_T ‖ p_θ^T) (None without ``targets``) at the masked positions.

    logits: (M, V) at the masked positions, in the autocast dtype; tokens: (M,) the clean tokens. The log-softmax
    at T = 1 is made once per position and shared by both terms; the KD term tempers from it.

    Why chunks: that float32 (M, V) log-softmax is the largest tensor of a step (M ~ B·L/2: 800 MB at B = 16,
    L = 512, V = 49k), and autograd would keep it, and the KL's (M, V) intermediates, for the backward. In
    chunks of ``chunk`` positions (default: LOSS_CHUNK_BYTES of float32), each chunk's float32 work is
    recomputed in the backward instead (activation checkpointing: one more elementwise pass over the chunk,
    no matmul), so only the logits themselves stay. When one chunk holds every position (every CPU run at the
    presets' sizes), the plain path runs: nothing is recomputed.
    """
    M, V = logits.shape
    chunk = chunk or max(1, LOSS_CHUNK_BYTES // (4 * V))
    if M <= chunk or not (torch.is_grad_enabled() and logits.requires_grad):
        return _position_terms(logits, tokens, targets)
    from torch.utils.checkpoint import checkpoint

    parts = targets.split(chunk) if targets is not None else [None] * -(-M // chunk)
    # split, not slicing: the backward of split assembles one (M, V) gradient, not one per chunk
    outs = [
        checkpoint(_position_terms, z, y, t, use_reentrant=False)
        for z, y, t in zip(logits.split(chunk), tokens.split(chunk), parts)
    ]
    nll = torch.cat([o[0] for o in outs])
    return nll, (torch.cat([o[1] for o in outs]) if targets is not None else None)


def _position_terms(
    logits: torch.Tensor, tokens: torch.Tensor, targets: SparseTargets | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`masked_losses` of one chunk: (m, V) logits, (m,) tokens -> (m,) nll, (m,) KL or None."""
    logp = student_logprobs(logits)  # (m, V) T = 1, at least float32
    nll = -logp.gather(1, tokens[:, None])[:, 0]  # (m,)
    if targets is None:
        return nll, None
    t = targets
    return nll, sparse_kl(logp, t.ids, t.logprobs, t.temperature, t.tail, slack=t.slack)


def elbo_weight(t: torch.Tensor, row: torch.Tensor, mask: torch.Tensor, maskable: torch.Tensor) -> torch.Tensor:
    """(M,) the 1/t ELBO weight of each masked position, t its row's or block's, corrected for forced masks.

    Stored masks force one position when the i.i.d. draw masks none (`shared.masking.sample_masks`). Such a
    row should weigh 0 (an empty mask contributes nothing to the ELBO), but a forced single position cannot be
    told from a drawn one. Given the ratio t of its block and a one-position mask {i} among n maskable positions,
    P(drawn | {i}) = t / (t + (1 - t)/n) (the other positions' factors cancel), so the unbiased weight
    (1/t)·P(drawn) = n / ((1 - t) + n·t): bounded by n, where 1/t reached 1/eps. Rows with two or more masked
    positions were drawn: 1/t. t: (M,); row: (M,); mask, maskable: (B, L) bool.
    """
    n = maskable.sum(-1).to(t.dtype)[row]  # (M,)
    single = (mask.sum(-1) == 1)[row]
    return torch.where(single, n / ((1.0 - t) + n * t), 1.0 / t)


def combined_loss(mdm: torch.Tensor, kd: torch.Tensor, lam: float) -> torch.Tensor:
    """(1-λ)·L_MDM + λ·L_KD for one λ; the unused term is dropped at λ ∈ {0, 1}, so its graph is never built."""
    if lam == 0.0:
        return mdm
    if lam == 1.0:
        return kd
    return (1.0 - lam) * mdm + lam * kd


def kd_weight(
    lam: float, progress: float, t: torch.Tensor, schedule: str = "constant", t_mode: str = "none"
) -> torch.Tensor:
    """λ_i = min(1, λ · s(progress) · g(t_i)) for mask ratios t (any shape): the KD weight of each position, t its
    row's or block's (docs/design.md).

    s over training progress p ∈ [0, 1]: constant 1, linear-decay 1 - p, cosine-decay (1 + cos πp)/2,
    linear-warmup min(1, 2p) (KD from nothing to full over the first half).
    g over the row's mask ratio t (the teacher's reliability depends on how much is masked, as in TIDE's
    TIDAL): none 1, low-t 2(1 - t), high-t 2t; both have mean 1 over t ~ U(0, 1), so λ keeps its meaning.
    """
    p = min(max(float(progress), 0.0), 1.0)
    s = {
        "constant": 1.0,
        "linear-decay": 1.0 - p,
        "cosine-decay": 0.5 * (1.0 + math.cos(math.pi * p)),
        "linear-warmup": min(1.0, 2.0 * p),
    }[schedule]
    g = {"none": torch.ones_like(t), "low-t": 2.0 * (1.0 - t), "high-t": 2.0 * t}[t_mode]
    return (lam * s * g).clamp(0.0, 1.0)
