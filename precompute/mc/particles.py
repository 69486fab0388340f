"""Monte Carlo completions of a batch of rows: one particle state, one sampler (docs/design.md §4; docs/mc.md).

Each of the R rows of a batch holds K particles, completions of the row in which the masked tokens are drawn
left to right, x_j ~ p_T(.|x_<j) at the sampling temperature, and the visible tokens are kept. All R·K particles
advance together, one position per decode step, in one KV cache (`decode.Decoder`): rows are all L tokens long,
so no padding and no position ids. At each step

- a particle whose row has the position masked records the top-m of p_T(.|x_<j) (the next-token score) and
  draws its token (`draw.inverse_cdf` of one counter-based uniform);
- a particle whose row has it visible adds log p_T(x_j | x_<j) to its log-weight (from the row's first masked
  position on; the proposal correction p_T/p_T^τ for drawn tokens when τ != 1);
- smc: a row at the end of a visible run with a masked position next resamples its K particles when their
  effective sample size falls below smc_ess·K (`resample`, systematic): the particles' tokens, recorded scores
  and cache rows are copied from their ancestors, and the row's weights reset.

Which particles do what at each position depends on the masks alone, so it is planned on the host once per batch
(`StepPlan`); weights, ESS, resampling decisions and ancestry stay on the device, and the results come back in
one copy at the end. No Python loop over rows runs inside the position loop.

Randomness is a pure function of (row seed, position, particle): `row_uniforms` reads a Philox stream keyed by
the row's seed, so a row draws the same tokens whichever rows share its batch (batch-size invariance), and a
resumed build draws what the first run drew.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import numpy as np
import torch

from ar2mdm.precompute.config import DEFAULT_TOKEN_BUDGET, BuildConfig
from ar2mdm.precompute.decode import CleanRows, Decoder
from ar2mdm.precompute.forward import text_config
from ar2mdm.student.draw import inverse_cdf


def next_token_keep(top_n: int) -> int:
    """Entries of each next-token distribution recorded for the mixture (the rest of its mass is dropped, so
    stored sums stay <= 1): the same on every backend."""
    return max(64, 4 * top_n)


def _default(name: str):
    return BuildConfig.__dataclass_fields__[name].default  # each default is written once, in BuildConfig


@dataclass(frozen=True)
class McSettings:
    """The mc mode's settings, decoded once from `BuildConfig` (`of`)."""

    k: int = _default("k")  # particles per row
    score: Literal["next-token", "full-conditional"] = _default("mc_score")
    weights: Literal["uniform", "importance", "smc"] = _default("mc_weights")
    temperature: float = _default("sample_temperature")
    top_n: int = _default("top_n")  # entries of each target handed back (the build's support size)
    rescore_k: int = _default("rescore_k")
    window: int | None = None  # full-conditional scores' right context, at most (None: the rest of the row)
    token_budget: int = DEFAULT_TOKEN_BUDGET  # the build passes its own (`autosize.resolve_auto`)
    smc_ess: float = _default("smc_ess")

    @classmethod
    def of(cls, cfg: BuildConfig, top_n: int) -> "McSettings":
        return cls(
            k=cfg.k,
            score=cfg.mc_score,
            weights=cfg.mc_weights,
            temperature=cfg.sample_temperature,
            top_n=top_n,
            rescore_k=cfg.rescore_k,
            window=cfg.right_window,
            token_budget=cfg.token_budget,
            smc_ess=cfg.smc_ess,
        )

    @property
    def keep(self) -> int:
        return next_token_keep(self.top_n)

    @property
    def resample_below(self) -> float:
        """smc's ESS threshold as a fraction of K; 0 (never) for importance and uniform weights."""
        return self.smc_ess if self.weights == "smc" else 0.0


def kv_bytes_per_position(config, elt: int) -> int:
    """Bytes one sequence's KV cache grows by per position: keys and values of every layer (elt: bytes per
    element of the model's dtype)."""
    c = text_config(config)
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * kv_heads * head_dim * elt


def bytes_per_row(config, L: int, K: int, keep: int, elt: int) -> int:
    """GPU memory one row's K particles take in `sample_particles` and the mixture after it (elt: bytes per
    element of the model's dtype): what `--batch-size` auto divides free memory by."""
    c = text_config(config)
    kv = K * L * kv_bytes_per_position(c, elt)  # the static cache of L positions
    logits = K * c.vocab_size * 4 * 6  # a step's float32 logits and their temporaries (log-softmax, cdf, top-m)
    scores = K * L * keep * 8  # recorded top-m ids (int32) and probabilities (float32)
    mixture = K * L * keep * 40  # the final mixture's sort: ids, probabilities, order, segments (64-bit)
    return kv + logits + scores + mixture


# ------------------------------------------------------------------------------------------- randomness


def row_uniforms(seeds: list[int], K: int, L: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniforms in [0, 1) for every (row, particle, position): the token draws (R, K, L) and the resampling
    offsets (R, L), float64. Row r's come from a Philox stream keyed by seeds[r] alone, laid out (L, K + 1)."""
    u = np.stack([np.random.Generator(np.random.Philox(key=int(s))).random((L, K + 1)) for s in seeds])  # (R, L, K+1)
    u = torch.from_numpy(u)
    return u[:, :, :K].transpose(1, 2).contiguous(), u[:, :, K].contiguous()


def ess(logw: torch.Tensor) -> torch.Tensor:
    """Effective sample size 1/Σ w_k² of self-normalised weights, per row of log-weights ``logw`` (R, K)."""
    w = torch.softmax(logw.double(), dim=-1)
    return 1.0 / (w**2).sum(-1)


def systematic_resample(logw: torch.Tensor, u0: torch.Tensor) -> torch.Tensor:
    """Ancestor indices (R, K) for weights softmax(logw) (R, K), by systematic resampling with offsets u0 (R,).

    Particle k is copied ⌊K·w_k⌋ or ⌈K·w_k⌉ times (the lowest-variance of the standard schemes), in order.
    """
    w = torch.softmax(logw.double(), dim=-1)
    K = w.shape[-1]
    cdf = torch.cumsum(w, -1)
    u = (u0.double()[:, None] + torch.arange(K, dtype=torch.float64, device=w.device)) / K  # (R, K) one stratum each
    return torch.searchsorted(cdf, u, right=True).clamp_(max=K - 1)


def resample(logw: torch.Tensor, u0: torch.Tensor, below: float):
    """Resample the rows of ``logw`` (R, K) whose ESS < below·K (0: never; 1: whenever their weights differ).

    Returns (ancestors (R, K), identity where not resampled; due (R,) bool; the ESS before (R,))."""
    K = logw.shape[-1]
    e = ess(logw)
    due = e < below * K * (1 - 1e-9)
    keep = torch.arange(K, device=logw.device).expand_as(logw)
    return torch.where(due[:, None], systematic_resample(logw, u0), keep), due, e


# ---------------------------------------------------------------------------------------- the sampler


def _csr(lists: list[np.ndarray], device) -> tuple[torch.Tensor, list[int]]:
    """Per-position index lists as one device tensor and host offsets: slicing it costs no host-device sync."""
    offsets = np.concatenate([[0], np.cumsum([len(a) for a in lists])]).tolist()
    flat = np.concatenate(lists) if lists else np.zeros(0, np.int64)
    return torch.as_tensor(flat, dtype=torch.long, device=device), offsets


@dataclass
class StepPlan:
    """What every particle does at each position, from the masks alone (host, once per batch)."""

    start: int  # the first position any row has masked: everything before it is one prefill
    masked: tuple[torch.Tensor, list[int]]  # per position: particles that draw there
    slot: tuple[torch.Tensor, list[int]]  # per position: for those particles, the index of the position in their
    #                                       row's masked positions (where the recorded score goes)
    weighed: tuple[torch.Tensor, list[int]]  # per position: particles whose row has it visible, after its first mask
    resampled: tuple[torch.Tensor, list[int]]  # per position: rows at the end of a visible run, a masked one next
    drawn: list[int]  # per position: masked positions drawn (rows), the progress bar's unit

    @classmethod
    def of(cls, masks: list[np.ndarray], L: int, K: int, smc: bool, device) -> "StepPlan":
        R = len(masks)
        m = np.zeros((R, L), bool)
        for r, pos in enumerate(masks):
            m[r, pos] = True
        first = np.asarray([int(p[0]) for p in masks])
        slot = np.cumsum(m, 1) - 1  # (R, L): index of each masked position among its row's
        after = np.arange(L)[None, :] >= first[:, None]
        visible = after & ~m
        resampled = np.zeros((R, L), bool)
        if smc:
            resampled[:, :-1] = visible[:, :-1] & m[:, 1:]
        parts = np.arange(K)

        def particles(rows):
            return (rows[:, None] * K + parts).reshape(-1)

        lists = {"masked": [], "slot": [], "weighed": [], "resampled": []}
        for j in range(L):
            rm = np.flatnonzero(m[:, j])
            lists["masked"].append(particles(rm))
            lists["slot"].append(np.repeat(slot[rm, j], K))
            lists["weighed"].append(particles(np.flatnonzero(visible[:, j])))
            lists["resampled"].append(np.flatnonzero(resampled[:, j]))
        return cls(
            start=int(first.min()),
            drawn=m.sum(0).tolist(),
            **{k: _csr(v, device) for k, v in lists.items()},
        )


def _at(csr: tuple[torch.Tensor, list[int]], j: int) -> torch.Tensor:
    flat, off = csr
    return flat[off[j] : off[j + 1]]


@dataclass
class Particles:
    """The K particles of each of R rows (N = R·K; row r's at r·K .. r·K + K - 1), as device tensors."""

    seqs: torch.Tensor  # (N, L) long: the completions so far
    logw: torch.Tensor  # (R, K) float64: log-weights since the row's last resampling
    top_ids: torch.Tensor  # (N, M, m) int32: per masked position (by slot) the top-m ids of p_T(.|x_<i) at T = 1
    top_probs: torch.Tensor  # (N, M, m) float32: their probabilities (0 on unused entries)
    ess_at: torch.Tensor  # (R, L) float64: the ESS before each resampling, NaN where none happened

    def copy(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """Particles ``dst`` become copies of their ancestors ``src`` (the recorded scores follow the ancestry)."""
        self.seqs[dst] = self.seqs[src]
        self.top_ids[dst] = self.top_ids[src]
        self.top_probs[dst] = self.top_probs[src]


@torch.no_grad()
def sample_particles(
    decoder: Decoder,
    xs: torch.Tensor,
    masks: list[np.ndarray],
    seeds: list[int],
    s: McSettings,
    *,
    on_step: Callable[[int], None] | None = None,
    prefix: tuple[CleanRows, torch.Tensor] | None = None,
) -> Particles:
    """K completions of each row of ``xs`` (R, L) with its ``masks`` (ascending positions, all >= 1) drawn.

    ``on_step(n)``: called after each decode step with the n masked positions it drew (the progress bar).
    ``prefix``: (clean rows, the index of each row of ``xs`` among them): the rows are prefixes of those clean
    rows, and the decoder starts from their cache instead of computing the prefix (`Decoder.prefill_from`)."""
    R, L = xs.shape
    K, dev = s.k, xs.device
    record = s.score == "next-token"  # full-conditional scores are computed after sampling, not recorded
    plan = StepPlan.of(masks, L, K, s.resample_below > 0, dev)
    u, u0 = (t.to(dev) for t in row_uniforms(seeds, K, L))
    u = u.reshape(R * K, L)
    if prefix is None:  # (N, V): the shortest shared prefix, its cache shared by K
        last = decoder.prefill(xs[:, : plan.start], K)
    else:
        last = decoder.prefill_from(prefix[0], prefix[1], plan.start, K)
    M = max(len(m) for m in masks) if record else 0
    m_keep = min(s.keep, last.shape[-1]) if record else 0
    p = Particles(
        seqs=xs.repeat_interleave(K, 0),
        logw=torch.zeros(R, K, dtype=torch.float64, device=dev),
        top_ids=torch.zeros(R * K, M, m_keep, dtype=torch.int32, device=dev),
        top_probs=torch.zeros(R * K, M, m_keep, dtype=torch.float32, device=dev),
        ess_at=torch.full((R, L), float("nan"), dtype=torch.float64, device=dev),
    )
    flat_logw = p.logw.view(-1)  # (N,) the same storage, for per-particle updates
    arange_k = torch.arange(K, device=dev)
    for j in range(plan.start, L):
        lp1 = torch.log_softmax(last, dim=-1)  # (N, V) p_T(.|x_<j) at T = 1
        idx = _at(plan.masked, j)  # particles that draw at j
        if len(idx):
            lpm = lp1[idx]
            if record:
                vals, ids = lpm.topk(m_keep, dim=-1)
                slot = _at(plan.slot, j)
                p.top_ids[idx, slot] = ids.int()
                p.top_probs[idx, slot] = vals.exp()
            lpt = lpm if s.temperature == 1.0 else torch.log_softmax(last[idx] / s.temperature, dim=-1)
            z = inverse_cdf(lpt.exp(), u[idx, j])  # (n,)
            if s.temperature != 1.0:  # proposal correction: target p_T, proposal p_T^τ
                corr = lpm.gather(1, z[:, None]) - lpt.gather(1, z[:, None])
                flat_logw.index_add_(0, idx, corr[:, 0].double())
            p.seqs[idx, j] = z
        idx = _at(plan.weighed, j)  # particles whose row has x_j visible: its likelihood weighs them
        if len(idx):
            flat_logw.index_add_(0, idx, lp1[idx].gather(1, p.seqs[idx, j : j + 1])[:, 0].double())
        rows = _at(plan.resampled, j)  # rows at a resampling point: a masked position is next
        if len(rows):
            anc, due, e = resample(p.logw[rows], u0[rows, j], s.resample_below)
            p.ess_at[rows, j] = torch.where(due, e, float("nan"))
            p.logw[rows] = torch.where(due[:, None], 0.0, p.logw[rows])
            dst = (rows[:, None] * K + arange_k).reshape(-1)
            src = (rows[:, None] * K + anc).reshape(-1)
            p.copy(dst, src)
            decoder.copy_rows(dst, src)
        if j + 1 < L:
            last = decoder.decode(p.seqs[:, j])
        if on_step and plan.drawn[j]:
            on_step(plan.drawn[j])
    return p
