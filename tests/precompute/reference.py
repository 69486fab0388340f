"""The reference implementation of top-K rescoring: one full causal forward per (target, candidate), and the
per-branch packing loop `pack_segment` replaced. Only the tests and benchmarks/rescoring.py (its baseline) use
them."""

import torch

from ar2mdm.precompute.forward import hidden_states, log_softmax_head, token_logliks
from ar2mdm.precompute.topk import NEG_INF, Branch, candidates
from ar2mdm.precompute.tree import PackedSegment


def pack_segment_loop(x: torch.Tensor, seg: list[Branch]) -> PackedSegment:
    """`tree.pack_segment` one branch at a time: a few small tensors per branch."""
    Lp = max(br.pos for br in seg)
    toks, pos = [x[:Lp]], [torch.arange(Lp)]
    pre, lo = [torch.zeros(Lp, dtype=torch.long)], [torch.zeros(Lp, dtype=torch.long)]
    tgt, owner = [], []
    start = Lp
    for br in seg:
        n, i = br.n, br.pos
        toks.append(torch.cat([torch.tensor([br.token]), x[i + 1 : i + n]]))  # [v, x_{i+1}, ..., x_{i+n-1}]
        pos.append(torch.arange(i, i + n))
        pre.append(torch.full((n,), i, dtype=torch.long))
        lo.append(torch.full((n,), start, dtype=torch.long))
        tgt.append(x[i + 1 : i + n + 1])
        owner.append(torch.full((n,), br.out, dtype=torch.long))
        start += n
    cat = torch.cat
    return PackedSegment(cat(toks), cat(pos), cat(pre), cat(lo), Lp, cat(tgt), cat(owner))


@torch.no_grad()
def rescore_naive(
    model, input_ids: torch.Tensor, positions: list[torch.Tensor], k: int, window: int | None, block_size=None
):
    """The reference: one full causal forward of [x_<i, v, x_{i+1..i+n-1}] per target and candidate, n the right
    context through the end of i's block (of the row without blocks), at most ``window``.

    Same output as `rescore`; the tests' reference and benchmarks/rescoring.py's baseline.
    """
    B, L = input_ids.shape
    results = []
    for b in range(B):
        x = input_ids[b]
        rows_c, rows_q = [], []
        for i in positions[b].tolist():
            end = L - 1 if block_size is None else (i // block_size + 1) * block_size - 1
            n = end - i if window is None else min(end - i, window)
            seqs = x[: i + n].repeat(k + 1, 1) if n > 0 else x[: i + 1].repeat(k + 1, 1)  # (K+1, i+max(n,1))
            h = hidden_states(model, x[None, :i])[0, -1:]  # (1, H)
            lp0 = log_softmax_head(model, h)[0]  # (V,)
            cand, valid = candidates(lp0[None].cpu().topk(k).indices, x[i : i + 1].cpu())
            cand, valid = cand[0], valid[0]
            seqs[:, i] = cand.to(x.device)
            s = lp0.cpu()[cand].clone()
            if n > 0:
                hs = hidden_states(model, seqs)  # (K+1, i+n, H)
                tg = x[i + 1 : i + n + 1]
                for c in range(k + 1):
                    s[c] += token_logliks(model, hs[c, i : i + n], tg).sum().cpu()
            s = s.masked_fill(~valid, NEG_INF)
            rows_c.append(cand)
            rows_q.append(torch.log_softmax(s, dim=-1))
        results.append((torch.stack(rows_c), torch.stack(rows_q)))
    return results
