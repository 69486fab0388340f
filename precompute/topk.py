"""Top-K rescoring (docs/design.md §3): the mode's maths, one implementation for every backend.

For a target position i of a row x (length L), the candidates C_i are the top-K of p_T(.|x_<i) plus the true
token x_i; for each v in C_i

    s(v) = log p_T(v | x_<i) + sum_{j=i+1}^{i+n} log p_T(x_j | x_<i, v, x_{i+1..j-1})
    q(v) = softmax_{v in C_i} s(v)

with n = `shared.blocks.right_context`: through the end of i's block (the row's end without blocks), at most
``--window`` tokens (0: the teacher's next-token distribution over the candidates, left context only).

A backend supplies the two teacher computations, as a `Scorer`: the first pass (`FirstPass`: the top-K of
p_T(.|x_<i) and the true token's log-prob at each position) and the summed log-likelihood of each branch
``[x_<i, v, x_{i+1..i+n}]`` (`Branch`). The torch backend packs a row's branches behind one copy of its prefix
(`tree.TorchScorer`), vLLM reads the prefixes from its prefix cache (`vllm_backend.VllmScorer`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ar2mdm.precompute.forward import check_finite
from ar2mdm.shared.blocks import right_context

NEG_INF = float("-inf")


@dataclass(frozen=True)
class FirstPass:
    """One row's first pass at its P target positions."""

    top_ids: torch.Tensor  # (P, K) long: the top-K of p_T(.|x_<i), most probable first
    top_logprobs: torch.Tensor  # (P, K) float32: their log-probs
    true_logprobs: torch.Tensor  # (P,) float32: log p_T(x_i | x_<i)


@dataclass
class Branch:
    """One rescoring branch ``[x_<i, v, x_{i+1..i+n}]``: n right-context tokens scored after candidate v at i."""

    row: int  # row in the batch
    pos: int  # target position i
    token: int  # candidate v placed at i
    n: int  # right-context tokens scored (`right_context`); 0: the branch adds nothing
    out: int  # its slot in the flat output: row's offset + slot·(K+1) + candidate


class Scorer(Protocol):
    def first_pass(self, rows: torch.Tensor, positions: list[torch.Tensor], k: int) -> list[FirstPass]:
        """Per row, the first pass at its positions; rows: (B, L) long on the host."""
        ...

    def branch_logliks(self, rows: torch.Tensor, branches: list[Branch], num_out: int) -> torch.Tensor:
        """(num_out,) the summed log-likelihood of each branch at its ``out`` slot (0 elsewhere, and for n = 0)."""
        ...


def candidates(top_ids: torch.Tensor, true_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The candidate set: top-K plus the true token.

    top_ids: (P, K); true_ids: (P,). Returns cand (P, K+1) long and valid (P, K+1) bool; the last slot holds the
    true token and is valid only when the true token is not already among the top-K.
    """
    k = top_ids.shape[1]
    in_top = (top_ids == true_ids[:, None]).any(dim=1)  # (P,)
    cand = torch.cat([top_ids, true_ids[:, None]], dim=1).long()  # (P, K+1)
    valid = torch.ones_like(cand, dtype=torch.bool)
    valid[:, k] = ~in_top
    return cand, valid


@torch.no_grad()
def rescore(
    scorer: Scorer,
    rows: torch.Tensor,
    positions: list[torch.Tensor],
    *,
    k: int,
    window: int | None,
    block_size: int | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rescoring targets for a batch of rows.

    rows: (B, L) long on the host; positions[b]: (P_b,) long target positions (each >= 1). Returns per row
    (cand (P_b, K+1) long, logq (P_b, K+1) float32) with logq = -inf on invalid slots and logsumexp over each
    row's valid slots = 0.
    """
    L = rows.shape[1]
    first = scorer.first_pass(rows, positions, k)
    cands, valids, firsts, branches, offsets = [], [], [], [], []
    out = 0
    for b, (f, pos) in enumerate(zip(first, positions)):
        pos = pos.long()
        cand, valid = candidates(f.top_ids, rows[b, pos])  # (P, K+1)
        cands.append(cand)
        valids.append(valid)
        firsts.append(torch.cat([f.top_logprobs, f.true_logprobs[:, None]], dim=1))  # (P, K+1) log p_T(v | x_<i)
        offsets.append(out)
        cand_b, valid_b = cand.tolist(), valid.tolist()  # Python lists: no tensor indexing per branch
        for p, i in enumerate(pos.tolist()):
            n = right_context(i, L, window, block_size)
            for c in range(k + 1):
                if valid_b[p][c]:
                    branches.append(Branch(b, i, cand_b[p][c], n, out + p * (k + 1) + c))
        out += len(pos) * (k + 1)
    right = scorer.branch_logliks(rows, branches, out).cpu()  # (out,) in the backend's precision
    results = []
    for b, pos in enumerate(positions):
        P = len(pos)
        s = firsts[b].to(right.dtype) + right[offsets[b] : offsets[b] + P * (k + 1)].view(P, k + 1)
        logq = torch.log_softmax(s.masked_fill(~valids[b], NEG_INF), dim=-1).float()
        check_finite(logq, "topk scores")
        results.append((cands[b], logq))
    return results
