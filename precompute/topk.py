"""Top-K rescoring (docs/design.md §3) on a transformers causal LM, with shared prefixes.

For a target position i of a row x (length L), candidates C_i = top-K of p_T(.|x_<i) plus the true token x_i;
for each v in C_i

    s(v) = log p_T(v | x_<i) + sum_{j=i+1}^{min(L-1, i+W)} log p_T(x_j | x_<i, v, x_{i+1..j-1})
    q(v) = softmax_{v in C_i} s(v)

Cost. A naive implementation runs one forward of length i+W per (i, v). Here one causal forward per row gives
log p_T(.|x_<i) at every i, and all "branches" [v, x_{i+1}, ..., x_{i+n-1}] of a row are packed behind one
copy of the row's prefix in a single sequence with a tree attention mask: a branch token sees the prefix
x_<i and the earlier tokens of its own branch, nothing else. So the prefix is computed once per segment instead
of once per (i, v), and segments of several rows are batched. `python -m benchmarks.rescoring` measures the gain.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ar2mdm.precompute.forward import budget_batches, check_finite, hidden_states, prefix_logprobs, token_logliks

NEG_INF = float("-inf")


def candidates(logp: torch.Tensor, true_ids: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of ``logp`` plus the true token.

    logp: (P, V); true_ids: (P,). Returns cand (P, k+1) long and valid (P, k+1) bool; the last slot holds the
    true token and is valid only when the true token is not already among the top-k.
    """
    top = logp.topk(k, dim=-1).indices  # (P, k)
    in_top = (top == true_ids[:, None]).any(dim=1)  # (P,)
    cand = torch.cat([top, true_ids[:, None]], dim=1)  # (P, k+1)
    valid = torch.ones_like(cand, dtype=torch.bool)
    valid[:, k] = ~in_top
    return cand, valid


@dataclass
class Branch:
    row: int  # row in the batch
    pos: int  # target position i
    token: int  # candidate v placed at i
    n: int  # number of right-context tokens scored: min(L-1-i, W)
    out: int  # index into the flat output vector


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
    """One packed segment of branches: a shared prefix, then each branch's block (tensors of length S)."""

    tokens: torch.Tensor  # (S,) token ids
    positions: torch.Tensor  # (S,) position ids
    prefix_end: torch.Tensor  # (S,) row r attends columns c < prefix_end[r] (its branch's x_<i) ...
    block_start: torch.Tensor  # (S,) ... and block_start[r] <= c <= r (the earlier tokens of its own block)
    prefix_len: int  # rows before this one are the shared prefix (no targets)
    targets: torch.Tensor  # (S - prefix_len,) the token each branch row predicts
    owner: torch.Tensor  # (S - prefix_len,) the output slot each branch row adds its log-likelihood to


def pack_segment(x: torch.Tensor, seg: list[Branch]) -> PackedSegment:
    """Token ids, position ids, tree-mask bounds and targets of one packed segment.

    A row r of the segment attends the columns c with c < pre[r] (the shared prefix x_<i of its branch) or
    lo[r] <= c <= r (the earlier tokens of its own block). Prefix rows have pre=0, lo=0: plain causal.
    Branch b's block is [v_b, x_{i+1}, ..., x_{i+n-1}] at positions i..i+n-1, predicting x_{i+1..i+n}: made for
    every branch at once with numpy (a few tensors per branch cost more host time than the GPU's forward).
    """
    xs = x.numpy()
    i = np.array([br.pos for br in seg], dtype=np.int64)  # (nb,)
    n = np.array([br.n for br in seg], dtype=np.int64)
    Lp = int(i.max())  # prefix x_0..x_{Lp-1} covers every branch's x_<i
    starts = Lp + np.concatenate([[0], np.cumsum(n)[:-1]])  # (nb,) first row of each block
    rep = np.repeat(np.arange(len(seg)), n)  # (T,) the branch of each block row
    k = np.arange(int(n.sum())) - np.repeat(starts - Lp, n)  # (T,) offset within its block
    ib = i[rep]
    tok = np.where(k == 0, np.array([br.token for br in seg], dtype=np.int64)[rep], xs[np.minimum(ib + k, len(xs) - 1)])
    t = torch.from_numpy
    return PackedSegment(
        tokens=torch.cat([x[:Lp], t(tok)]),
        positions=torch.cat([torch.arange(Lp), t(ib + k)]),
        prefix_end=torch.cat([torch.zeros(Lp, dtype=torch.long), t(ib)]),
        block_start=torch.cat([torch.zeros(Lp, dtype=torch.long), t(starts[rep])]),
        prefix_len=Lp,
        targets=t(xs[ib + k + 1]),
        owner=t(np.array([br.out for br in seg], dtype=np.int64)[rep]),
    )


FLEX_BLOCK = 128  # FlexAttention's block size; packed lengths are rounded up to it


def flex_batches(lengths: list[int], token_budget: int, segment_tokens: int) -> tuple[list[list[int]], int, list[int]]:
    """(batches of segment indices, the one padded length S, each batch's padded row count) for the flex tree
    mask. transformers compiles flex_attention for fixed shapes (dynamic=False), and torch stops compiling a
    function after 8 shapes and runs it unfused, far slower: so every batch has the same S (the segment size,
    rounded up to FLEX_BLOCK) and a power-of-two row count up to the budget's, at most 8 shapes in a build. The
    rows that pad a batch attend only themselves (cheap in attention; the MLPs compute them: the last batch of
    a call only)."""
    S = -(-max(segment_tokens, *lengths) // FLEX_BLOCK) * FLEX_BLOCK
    per = max(1, token_budget // S)
    batches = [list(range(a, min(a + per, len(lengths)))) for a in range(0, len(lengths), per)]
    return batches, S, [min(per, 1 << (len(b) - 1).bit_length()) for b in batches]


def flex_hidden_states(model, toks, pre, lo, positions) -> torch.Tensor:
    """(B, S, H) hidden states under the packed tree mask, as FlexAttention: row q of batch b attends kv with
    kv < pre[b, q] (its branch's prefix) or lo[b, q] <= kv <= q (its own block). The block mask skips the
    blocks no row attends, and no (B, S, S) mask is made."""
    from torch.nn.attention.flex_attention import create_block_mask

    def mask_mod(b, h, q, kv):
        return (kv < pre[b, q]) | ((kv >= lo[b, q]) & (kv <= q))

    B, S = toks.shape
    block = create_block_mask(mask_mod, B, None, S, S, device=toks.device, BLOCK_SIZE=FLEX_BLOCK)
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
            toks[j, :n], posi[j, :n], pre[j, :n], lo[j, :n] = p.tokens, p.positions, p.prefix_end, p.block_start
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


@torch.no_grad()
def rescore(
    model,
    input_ids: torch.Tensor,
    positions: list[torch.Tensor],
    *,
    k: int,
    window: int | None,
    token_budget: int = 4096,
    tree_mask: str = "dense",
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Rescoring targets for a batch of rows (``tree_mask``: see `branch_logliks`).

    input_ids: (B, L) long on the model's device; positions[b]: (P_b,) long target positions (each >= 1).
    window: W, the number of right-context tokens scored (None: the whole right context of the row).
    Returns per row (cand (P_b, K+1) long, logq (P_b, K+1) float32) with logq = -inf on invalid slots and
    logsumexp over each row's valid slots = 0.
    """
    B, L = input_ids.shape
    dev = input_ids.device
    pos_all = torch.cat([p.long() for p in positions]).to(dev)  # (ΣP,) rows one after another
    row_all = torch.cat([torch.full((len(p),), b, dtype=torch.long) for b, p in enumerate(positions)]).to(dev)
    logp = prefix_logprobs(model, input_ids, row_all, pos_all)  # (ΣP, V)
    true = input_ids[row_all, pos_all]  # (ΣP,)
    cand, valid = candidates(logp, true, k)  # (ΣP, K+1) on the device: the (ΣP, V) log-probs never leave it
    first = logp.gather(1, cand)  # (ΣP, K+1) log p_T(v | x_<i)
    sizes = [len(p) for p in positions]
    cands, valids, firsts = (t.cpu().split(sizes) for t in (cand, valid, first))  # one small copy each
    branches, offsets = [], []
    out = 0
    for b in range(B):
        offsets.append(out)
        cand_b, valid_b = cands[b].tolist(), valids[b].tolist()  # Python lists: no tensor indexing per branch
        for p, i in enumerate(positions[b].tolist()):
            n = L - 1 - i if window is None else min(L - 1 - i, window)
            for c in range(k + 1):
                if valid_b[p][c]:
                    branches.append(Branch(b, i, cand_b[p][c], n, out + p * (k + 1) + c))
        out += sizes[b] * (k + 1)
    right = branch_logliks(
        model, input_ids, branches, num_out=out, token_budget=token_budget, tree_mask=tree_mask
    ).cpu()
    results = []
    for b in range(B):
        P = len(positions[b])
        s = firsts[b] + right[offsets[b] : offsets[b] + P * (k + 1)].view(P, k + 1)
        s = s.masked_fill(~valids[b], NEG_INF)
        results.append((cands[b], torch.log_softmax(s, dim=-1)))
        check_finite(results[-1][1], "topk scores")
    return results
