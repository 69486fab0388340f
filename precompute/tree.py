"""The torch backend's topk computations (`topk.Scorer`) on a transformers causal LM, with shared prefixes.

The first pass is one causal forward per row: log p_T(.|x_<i) at every target position, its top-K and the true
token's log-prob. For the branches, a naive implementation would run one forward of length i+n per (i, v). Here
all branches [v, x_{i+1}, ..., x_{i+n-1}] of a row are packed behind one copy of the row's prefix in a single
sequence with a tree attention mask: a branch token sees the prefix x_<i and the earlier tokens of its own branch,
nothing else. So the prefix is computed once per segment instead of once per (i, v), and segments of several rows
are batched. `python -m benchmarks.rescoring` measures the gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ar2mdm.precompute.forward import budget_batches, hidden_states, prefix_logprobs, token_logliks
from ar2mdm.precompute.topk import Branch, FirstPass


@dataclass
class TorchScorer:
    """`topk.Scorer` on a transformers causal LM: ``tree_mask`` "dense" (a (B, 1, S, S) boolean mask, SDPA) or
    "flex" (`flex_hidden_states`: the same mask as a FlexAttention block mask, never materialised)."""

    model: object
    token_budget: int = 4096  # tokens per packed branch forward
    tree_mask: str = "dense"

    @torch.no_grad()
    def first_pass(self, rows: torch.Tensor, positions: list[torch.Tensor], k: int) -> list[FirstPass]:
        dev = next(self.model.parameters()).device
        x = rows.to(dev)
        pos_all = torch.cat([p.long() for p in positions]).to(dev)  # (ΣP,) rows one after another
        row_all = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)]).to(dev)
        logp = prefix_logprobs(self.model, x, row_all, pos_all)  # (ΣP, V): never leaves the device
        top_lp, top_ids = logp.topk(k, dim=-1)  # (ΣP, K)
        true_lp = logp.gather(1, x[row_all, pos_all][:, None])[:, 0]  # (ΣP,)
        sizes = [len(p) for p in positions]
        parts = (t.cpu().split(sizes) for t in (top_ids, top_lp, true_lp))  # one small copy each
        return [FirstPass(i, lp, t) for i, lp, t in zip(*parts)]

    def branch_logliks(self, rows: torch.Tensor, branches: list[Branch], num_out: int) -> torch.Tensor:
        dev = next(self.model.parameters()).device
        return branch_logliks(
            self.model,
            rows.to(dev),
            branches,
            num_out=num_out,
            token_budget=self.token_budget,
            tree_mask=self.tree_mask,
        )


def _segments(branches: list[Branch], max_tokens: int) -> list[list[Branch]]:
    """Group one row's branches (sorted by position) into segments of at most ~max_tokens tokens."""
    segs, cur, cur_tokens = [], [], 0
    for br in branches:
        need = br.n + (br.pos if not cur else max(0, br.pos - cur[-1].pos))  # prefix grows to the largest i
        if cur and cur_tokens + need > max_tokens:
            segs.append(cur)
            cur, cur_tokens = [], 0
            need = br.n + br.pos
        cur.append(br)
        cur_tokens += need
    if cur:
        segs.append(cur)
    return segs


@dataclass
class PackedSegment:
    """One packed segment of branches: a shared prefix, then each branch's tokens (tensors of length S)."""

    tokens: torch.Tensor  # (S,) token ids
    positions: torch.Tensor  # (S,) position ids
    prefix_end: torch.Tensor  # (S,) row r attends columns c < prefix_end[r] (its branch's x_<i) ...
    branch_start: torch.Tensor  # (S,) ... and branch_start[r] <= c <= r (the earlier tokens of its own branch)
    prefix_len: int  # rows before this one are the shared prefix (no targets)
    targets: torch.Tensor  # (S - prefix_len,) the token each branch row predicts
    owner: torch.Tensor  # (S - prefix_len,) the output slot each branch row adds its log-likelihood to


def pack_segment(x: torch.Tensor, seg: list[Branch]) -> PackedSegment:
    """Token ids, position ids, tree-mask bounds and targets of one packed segment.

    A row r of the segment attends the columns c with c < pre[r] (the shared prefix x_<i of its branch) or
    lo[r] <= c <= r (the earlier tokens of its own branch). Prefix rows have pre=0, lo=0: plain causal.
    Branch b's tokens are [v_b, x_{i+1}, ..., x_{i+n-1}] at positions i..i+n-1, predicting x_{i+1..i+n}: made for
    every branch at once with numpy (a few tensors per branch cost more host time than the GPU's forward).
    """
    xs = x.numpy()
    i = np.array([br.pos for br in seg], dtype=np.int64)  # (nb,)
    n = np.array([br.n for br in seg], dtype=np.int64)
    Lp = int(i.max())  # prefix x_0..x_{Lp-1} covers every branch's x_<i
    starts = Lp + np.concatenate([[0], np.cumsum(n)[:-1]])  # (nb,) first row of each branch
    rep = np.repeat(np.arange(len(seg)), n)  # (T,) the branch each non-prefix row belongs to
    k = np.arange(int(n.sum())) - np.repeat(starts - Lp, n)  # (T,) offset within its branch
    ib = i[rep]
    tok = np.where(k == 0, np.array([br.token for br in seg], dtype=np.int64)[rep], xs[np.minimum(ib + k, len(xs) - 1)])
    t = torch.from_numpy
    return PackedSegment(
        tokens=torch.cat([x[:Lp], t(tok)]),
        positions=torch.cat([torch.arange(Lp), t(ib + k)]),
        prefix_end=torch.cat([torch.zeros(Lp, dtype=torch.long), t(ib)]),
        branch_start=torch.cat([torch.zeros(Lp, dtype=torch.long), t(starts[rep])]),
        prefix_len=Lp,
        targets=t(xs[ib + k + 1]),
        owner=t(np.array([br.out for br in seg], dtype=np.int64)[rep]),
    )


FLEX_TILE = 128  # FlexAttention's tile (its BLOCK_SIZE); packed lengths are rounded up to it


def flex_batches(lengths: list[int], token_budget: int, segment_tokens: int) -> tuple[list[list[int]], int, list[int]]:
    """(batches of segment indices, the one padded length S, each batch's padded row count) for the flex tree
    mask. transformers compiles flex_attention for fixed shapes (dynamic=False), and torch stops compiling a
    function after 8 shapes and runs it unfused, far slower: so every batch has the same S (the segment size,
    rounded up to FLEX_TILE) and a power-of-two row count up to the budget's, at most 8 shapes in a build. The
    rows that pad a batch attend only themselves (cheap in attention; the MLPs compute them: the last batch of
    a call only)."""
    S = -(-max(segment_tokens, *lengths) // FLEX_TILE) * FLEX_TILE
    per = max(1, token_budget // S)
    batches = [list(range(a, min(a + per, len(lengths)))) for a in range(0, len(lengths), per)]
    return batches, S, [min(per, 1 << (len(b) - 1).bit_length()) for b in batches]


def flex_hidden_states(model, toks, pre, lo, positions) -> torch.Tensor:
    """(B, S, H) hidden states under the packed tree mask, as FlexAttention: row q of batch b attends kv with
    kv < pre[b, q] (its branch's prefix) or lo[b, q] <= kv <= q (its own branch). The block mask skips the
    tiles no row attends, and no (B, S, S) mask is made."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (kv < pre[b, q]) | ((kv >= lo[b, q]) & (kv <= q))

    B, S = toks.shape
    block = create_block_mask(mask_mod, B, None, S, S, device=toks.device, BLOCK_SIZE=FLEX_TILE)
    before = model.config._attn_implementation
    model.set_attn_implementation("flex_attention")
    try:
        return hidden_states(model, toks, attention_mask=block, position_ids=positions)
    finally:
        model.set_attn_implementation(before)


@torch.no_grad()
def branch_logliks(
    model,
    input_ids: torch.Tensor,
    branches: list[Branch],
    *,
    num_out: int,
    token_budget: int = 4096,
    segment_tokens: int = 1024,
    tree_mask: str = "dense",
) -> torch.Tensor:
    """sum_j log p_T(x_j | x_<i, v, x_{i+1..j-1}) for every branch, as a (num_out,) float32 tensor.

    input_ids: (B, L) on the model's device; branches with n == 0 contribute 0. ``tree_mask``: "dense" (a
    (B, 1, S, S) boolean mask, SDPA) or "flex" (`flex_hidden_states`: the same mask as a FlexAttention block mask,
    never materialised).
    """
    dev = input_ids.device
    result = torch.zeros(num_out, dtype=torch.float32, device=dev)
    x_cpu = input_ids.cpu()
    by_row: dict[int, list[Branch]] = {}
    for br in branches:
        if br.n > 0:
            by_row.setdefault(br.row, []).append(br)
    packed = []
    for row, brs in by_row.items():
        brs.sort(key=lambda b: b.pos)
        for seg in _segments(brs, segment_tokens):
            packed.append(pack_segment(x_cpu[row], seg))
    if not packed:
        return result
    lengths = [len(p.tokens) for p in packed]
    if tree_mask == "flex":  # few distinct shapes: each one is compiled once
        batches, S_flex, rows = flex_batches(lengths, token_budget, segment_tokens)
    else:
        batches = budget_batches(lengths, token_budget)
    for b, idx in enumerate(batches):
        batch = [packed[j] for j in idx]
        S, Bn = (S_flex, rows[b]) if tree_mask == "flex" else (max(len(p.tokens) for p in batch), len(batch))
        toks = torch.zeros(Bn, S, dtype=torch.long)
        posi = torch.zeros(Bn, S, dtype=torch.long)
        pre = torch.zeros(Bn, S, dtype=torch.long)
        lo = torch.arange(S).repeat(Bn, 1)  # padding rows attend only themselves (no all-masked rows: no NaN)
        for j, p in enumerate(batch):
            n = len(p.tokens)
            toks[j, :n], posi[j, :n], pre[j, :n], lo[j, :n] = p.tokens, p.positions, p.prefix_end, p.branch_start
        toks, posi, pre, lo = (a.to(dev, non_blocking=True) for a in (toks, posi, pre, lo))
        if tree_mask == "flex":
            h = flex_hidden_states(model, toks, pre, lo, posi)
        else:
            # the (Bn, S, S) mask is made on the device from the two (Bn, S) bounds: made on the host it took
            # longer than the forward, and crossed PCIe at S² bytes per row
            col = torch.arange(S, device=dev)
            row = col[:, None]
            allowed = (col[None, None, :] < pre[:, :, None]) | (
                (col[None, None, :] >= lo[:, :, None]) & (col[None, None, :] <= row[None])
            )  # (Bn, S, S)
            h = hidden_states(model, toks, attention_mask=allowed[:, None], position_ids=posi)
        sel_h, sel_t, sel_o = [], [], []
        for j, p in enumerate(batch):
            sel_h.append(h[j, p.prefix_len : len(p.tokens)])
            sel_t.append(p.targets)
            sel_o.append(p.owner)
        ll = token_logliks(model, torch.cat(sel_h), torch.cat(sel_t).to(dev))  # (N,)
        result.index_add_(0, torch.cat(sel_o).to(dev), ll)
    return result
