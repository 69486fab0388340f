"""Issue 10: the torch backend's mc over several rows at once (`mc_rows`) equals the row-by-row sampler draw for
draw, and its estimates converge to the exact limits (enumeration, tests/precompute/test_mc.py)."""

import pytest
import torch

from ar2mdm.precompute.mc import mc_targets, sample_completions
from ar2mdm.precompute.mc_rows import mc_targets_rows, sample_completions_rows
from tests.precompute.test_mc import dense, exact_limits, tv
from tests.tiny import tiny_llama

V = 8
# rows of equal length with different masks: first masked positions 1, 2 and 4, runs of several lengths
ROWS = torch.tensor([[1, 3, 0, 5, 0, 2, 6, 4, 7, 1], [1, 6, 2, 2, 7, 0, 3, 5, 1, 2], [1, 4, 4, 0, 6, 3, 3, 7, 2, 5]])
MASKED = [[1, 2, 5, 8], [2, 4, 7], [4, 5, 6]]


@pytest.mark.parametrize("temperature,smc_ess", [(1.0, 0.0), (1.0, 1.0), (1.0, 0.5), (0.7, 1.0)])
def test_rows_at_once_equal_row_by_row_draw_for_draw(temperature, smc_ess):
    model = tiny_llama(V, seed=3, sharpness=3.0).double()
    K = 16
    got = sample_completions_rows(
        model,
        ROWS,
        MASKED,
        K,
        temperature,
        [torch.Generator().manual_seed(10 + r) for r in range(3)],
        keep=5,
        smc_ess=smc_ess,
    )
    for r in range(3):
        ref = sample_completions(
            model, ROWS[r], MASKED[r], K, temperature, torch.Generator().manual_seed(10 + r), keep=5, smc_ess=smc_ess
        )
        assert torch.equal(got[r].seqs, ref.seqs)
        torch.testing.assert_close(got[r].logw, ref.logw, atol=1e-5, rtol=0)  # _logits returns float32
        assert got[r].ess_before == pytest.approx(ref.ess_before)
        for a, b in zip(got[r].next_ids + got[r].next_probs, ref.next_ids + ref.next_probs):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)  # _logits returns float32
    if smc_ess == 1.0:
        # resampling happened where a visible run precedes a masked position (rows 0, 1), never in row 2
        assert len(got[0].ess_before) > 0 and len(got[1].ess_before) > 0 and got[2].ess_before == []


@pytest.mark.parametrize("score", ["next-token", "full-conditional"])
def test_rows_at_once_targets_equal_row_by_row(score):
    model = tiny_llama(V, seed=4, sharpness=3.0).double()
    gens = [torch.Generator().manual_seed(r) for r in range(3)]
    got = mc_targets_rows(model, ROWS, MASKED, 12, score, "smc", 1.0, gens, top_n=V, rescore_k=4, window=3, smc_ess=1.0)
    for r in range(3):
        ref = mc_targets(
            model,
            ROWS[r],
            MASKED[r],
            12,
            score,
            "smc",
            1.0,
            torch.Generator().manual_seed(r),
            top_n=V,
            rescore_k=4,
            window=3,
            smc_ess=1.0,
        )
        assert got[r].ess == pytest.approx(ref.ess)
        for (ia, la), (ib, lb) in zip(zip(got[r].ids, got[r].logprobs), zip(ref.ids, ref.logprobs)):
            assert tv(dense(ia, la), dense(ib, lb)) < 1e-5


def test_rows_at_once_converge_to_the_exact_limit():
    model = tiny_llama(V, seed=5, sharpness=4.0)
    x = torch.tensor([1, 3, 0, 5, 0, 2])
    masked = [2, 4]
    limits = exact_limits(model, x, masked)
    # the same row twice, other draws: each estimate near the importance limit
    got = mc_targets_rows(
        model,
        x.repeat(2, 1),
        [masked, masked],
        3000,
        "next-token",
        "smc",
        1.0,
        [torch.Generator().manual_seed(s) for s in (1, 2)],
        top_n=V,
        smc_ess=1.0,
    )
    for est in got:
        for p, i in enumerate(masked):
            own = limits[i][("importance", "next-token")]
            assert tv(dense(est.ids[p], est.logprobs[p]), own) < 0.04
