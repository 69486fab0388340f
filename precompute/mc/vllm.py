"""vLLM mc for many rows at once, by forced decoding (the plan `VllmTeacher.mc_batch` runs).

Every (row, sample) is one request: its prompt is the row up to its first masked position, and it generates
the rest of the row with the row's visible tokens forced (`force.ForceTokens`) and its masked tokens
sampled. The engine returns, at every step, the raw top-m log-probs (the next-token score at a masked step)
and the emitted token's raw log-prob (at a forced step: log p_T(x_j | x_<j), the importance weight's factor).
So uniform and importance weights take one engine call for all the rows handed over, whatever their masks.

smc must look at the weights between visible runs, so its requests stop at each *segment* end: a segment
starts at a masked position that follows a visible run and holds that masked run and the visible run after it.
After each engine call the rows whose segment ended check their ESS, resample their particles (the prompt of
the next segment is the resampled prefix, which the prefix cache holds) and send the next segment; every row
advances in the same call, so the calls per batch are the segments of the longest row, not rows × masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ar2mdm.precompute.mc.particles import resample, row_uniforms

FORCE_KEY = "ar2mdm_force"  # SamplingParams.extra_args key of the tokens `force.ForceTokens` forces


def request_seed(*parts: int) -> int:
    h = 0
    for p in parts:
        h = (h * 1_000_003 + int(p)) % (2**31 - 1)
    return h


def segments(L: int, masked: list[int], smc: bool, tail: bool) -> list[tuple[int, int]]:
    """[start, end) spans a row's requests generate: one span from the first masked position, or (smc) one per
    masked run that follows a visible run. The last span ends at L when the weights need the trailing visible
    run (``tail``), else just after the last masked position."""
    starts = [masked[0]] + ([m for a, m in zip(masked, masked[1:]) if m - a > 1] if smc else [])
    end = L if tail else masked[-1] + 1
    return list(zip(starts, starts[1:] + [end]))


def step_arrays(c, keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A completion's per-step log-probs, from ``SamplingParams(logprobs=keep, flat_logprobs=True)``: the emitted
    tokens' raw log-probs (S,), and the top-``keep`` ids (S, keep) and raw log-probs (S, keep), best first.

    vLLM stores each step as [emitted token, rank 1, ..., rank keep] in flat lists (``FlatLogprobs``): reading
    those directly skips the dict of ``Logprob`` objects per step, which at K·L·keep entries per row is what
    the engine's caller would otherwise spend its time on."""
    S, fl = len(c.token_ids), c.logprobs
    ids = np.asarray(fl.token_ids, dtype=np.int64)
    lps = np.asarray(fl.logprobs, dtype=np.float64)
    if ids.size != S * (keep + 1):
        raise RuntimeError(
            f"vLLM returned {ids.size} log-probs for {S} steps of {keep} + 1 (flat_logprobs unsupported?)"
        )
    ids, lps = ids.reshape(S, keep + 1), lps.reshape(S, keep + 1)
    return lps[:, 0], ids[:, 1:], lps[:, 1:]


@dataclass
class RowState:
    """One row's K particles between engine calls."""

    x: list[int]
    masked: list[int]
    seed: int
    K: int
    spans: list[tuple[int, int]]
    smc_ess: float
    seqs: list[list[int]] = field(init=False)
    logw: torch.Tensor = field(init=False)  # (K,) float64, since the last resampling
    next_ids: dict[int, torch.Tensor] = field(default_factory=dict)  # masked position -> (K, m)
    next_probs: dict[int, torch.Tensor] = field(default_factory=dict)
    ess_before: list[float] = field(default_factory=list)
    span: int = 0  # the next span to generate

    def __post_init__(self):
        self.seqs = [list(self.x) for _ in range(self.K)]
        self.logw = torch.zeros(self.K, dtype=torch.float64)
        self.u0 = row_uniforms([self.seed], self.K, len(self.x))[1][0]  # (L,) resampling offsets, as on torch
        self.mset = set(self.masked)

    @property
    def done(self) -> bool:
        return self.span >= len(self.spans)

    def requests(self) -> list[tuple[list[int], list[int], int]]:
        """(prompt, force, seed) per particle for the next span; force[s] = -1 where the token is sampled."""
        a, b = self.spans[self.span]
        force = [-1 if j in self.mset else self.x[j] for j in range(a, b)]
        return [(self.seqs[k][:a], force, request_seed(self.seed, self.span, k)) for k in range(self.K)]

    def absorb(self, outs, keep: int) -> int:
        """Write the K outputs of the span just generated into the particles, then resample if due. Returns the
        masked positions the span drew."""
        a, b = self.spans[self.span]
        for j in range(a, b):
            if j in self.mset:
                self.next_ids[j] = torch.zeros(self.K, keep, dtype=torch.long)
                self.next_probs[j] = torch.zeros(self.K, keep, dtype=torch.float64)
        idx = np.arange(a, b)
        is_masked = np.asarray([j in self.mset for j in idx])
        visible = np.asarray([self.x[j] for j in idx])
        for k, o in enumerate(outs):
            c = o.outputs[0]
            if len(c.token_ids) != b - a:
                raise RuntimeError(f"vLLM returned {len(c.token_ids)} tokens for a span of {b - a} (a stop token?)")
            toks = np.asarray(c.token_ids)
            if (toks[~is_masked] != visible[~is_masked]).any():
                raise RuntimeError(
                    "the vLLM engine did not force a visible token: is the ForceTokens logits "
                    "processor registered (and speculative decoding off)?"
                )
            emitted_lp, top_ids, top_lp = step_arrays(c, keep)
            self.logw[k] += float(emitted_lp[~is_masked].sum())
            for s in np.flatnonzero(is_masked).tolist():
                j = a + s
                self.seqs[k][j] = int(toks[s])
                self.next_ids[j][k] = torch.from_numpy(top_ids[s])
                self.next_probs[j][k] = torch.from_numpy(np.exp(top_lp[s]))
        self.span += 1
        drawn = int(is_masked.sum())
        if not self.done and self.smc_ess > 0:  # only smc has spans after the first
            j = self.spans[self.span][0] - 1  # the visible position before the next masked run
            anc, due, e = resample(self.logw[None], self.u0[j : j + 1], self.smc_ess)
            if bool(due[0]):
                self.ess_before.append(float(e[0]))
                anc = anc[0].tolist()
                self.seqs = [list(self.seqs[i]) for i in anc]
                for i in self.next_ids:  # the scores recorded so far follow their particle's ancestry
                    self.next_ids[i] = self.next_ids[i][anc]
                    self.next_probs[i] = self.next_probs[i][anc]
                self.logw = torch.zeros(self.K, dtype=torch.float64)
        return drawn
