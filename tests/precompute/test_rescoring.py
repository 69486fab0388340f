import numpy as np
import pytest
import torch

from ar2mdm.precompute.sparsify import select_top_n
from ar2mdm.precompute.topk import rescore
from ar2mdm.precompute.tree import TorchScorer
from tests.precompute.reference import rescore_naive
from tests.tiny import DEVICES, tiny_llama

V = 12


def hf_rescore(model, x, positions, *, k, window, token_budget=4096, tree_mask="dense", block_size=None):
    """`rescore` on the torch backend's scorer."""
    scorer = TorchScorer(model, token_budget, tree_mask)
    return rescore(scorer, x.cpu(), positions, k=k, window=window, block_size=block_size)


def joint_logprob(model, seq: torch.Tensor) -> torch.Tensor:
    """log p_T(x_1..x_{L-1} | x_0) by one causal forward: the brute-force reference."""
    lp = torch.log_softmax(model(seq[None]).logits[0].float(), dim=-1)
    return lp[torch.arange(len(seq) - 1), seq[1:]].sum()


def dense(cand, logq, vocab):
    q = torch.zeros(vocab, dtype=torch.float64)
    for c, lq in zip(cand.tolist(), logq.tolist()):
        if lq > float("-inf"):
            q[c] += torch.tensor(lq).exp()
    return q


@torch.no_grad()
def test_rescoring_equals_exact_conditional_by_enumeration():
    model = tiny_llama(V, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (3, 7), generator=g)
    positions = [torch.tensor([1, 3, 6]), torch.tensor([2, 5]), torch.tensor([1, 2, 3, 4, 5, 6])]
    res = hf_rescore(model, x, positions, k=V, window=None, token_budget=40)  # small budget: many packed batches
    for b in range(3):
        for p, i in enumerate(positions[b].tolist()):
            scores = []
            for v in range(V):
                y = x[b].clone()
                y[i] = v
                scores.append(joint_logprob(model, y))
            exact = torch.softmax(torch.stack(scores).double(), dim=0)  # q(v | x_-i), every v enumerated
            got = dense(res[b][0][p], res[b][1][p], V)
            assert torch.allclose(got, exact, atol=1e-4), (b, i, (got - exact).abs().max())


@torch.no_grad()
def test_window_truncation_matches_direct_computation():
    model = tiny_llama(V, seed=2)
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, V, (2, 10), generator=g)
    positions = [torch.tensor([1, 4, 8, 9]), torch.tensor([3, 6])]
    W = 3
    res = hf_rescore(model, x, positions, k=4, window=W, token_budget=64)
    for b in range(2):
        for p, i in enumerate(positions[b].tolist()):
            cand, logq = res[b][0][p], res[b][1][p]
            s = []
            for c in range(len(cand)):
                y = x[b].clone()
                y[i] = cand[c]
                lp = torch.log_softmax(model(y[None]).logits[0].float(), dim=-1)
                last = min(len(y) - 1, i + W)
                s.append(sum(lp[j - 1, y[j]] for j in range(i, last + 1)))  # j=i: log p(v|x_<i), then the window
            s = torch.stack(s).masked_fill(~torch.isfinite(logq), float("-inf"))
            assert torch.allclose(torch.log_softmax(s, 0).exp(), logq.exp(), atol=1e-5)


@torch.no_grad()
def test_true_token_always_in_support_and_packed_equals_naive():
    model = tiny_llama(V, seed=3)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, V, (2, 9), generator=g)
    positions = [torch.arange(1, 9), torch.tensor([2, 7])]
    fast = hf_rescore(model, x, positions, k=1, window=4, token_budget=16)
    slow = rescore_naive(model, x, positions, k=1, window=4)
    for b in range(2):
        assert torch.equal(fast[b][0], slow[b][0])
        assert torch.allclose(fast[b][1].exp(), slow[b][1].exp(), atol=1e-5)
        ids, lps = select_top_n(fast[b][0], fast[b][1], top_n=4)
        for p, i in enumerate(positions[b].tolist()):
            assert int(x[b, i]) in ids[p].tolist()  # the true token is kept even though k=1
            assert abs(sum(torch.tensor(lps[p]).exp().tolist()) - 1) < 1e-5
    # with k=1 some position must have needed the extra slot, or this test checks nothing
    assert any(torch.isfinite(fast[b][1][:, 1]).any() for b in range(2))


def test_select_top_n_orders_and_truncates():
    cand = torch.tensor([[5, 3, 9, 1]])
    logq = torch.log(torch.tensor([[0.2, 0.5, 0.3, 0.0]]))
    ids, lps = select_top_n(cand, logq, top_n=2)
    assert ids[0].tolist() == [3, 9]
    assert torch.allclose(torch.tensor(lps[0]).exp(), torch.tensor([0.5, 0.3]))


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_head_path_applies_the_models_logit_scaling(arch):
    """topk/fim apply the head to hidden states; their log-probs must be the model's own."""
    import transformers

    from ar2mdm.precompute.forward import check_head_path, hidden_states, log_softmax_head

    cfg_cls, model_cls, kw = {
        "granite": (transformers.GraniteConfig, transformers.GraniteForCausalLM, dict(logits_scaling=4.0)),
        "cohere": (transformers.CohereConfig, transformers.CohereForCausalLM, dict(logit_scale=0.3)),
    }[arch]
    torch.manual_seed(0)
    model = model_cls(
        cfg_cls(
            vocab_size=40,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            **kw,
        )
    ).eval()
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(10)
        x = torch.randint(3, 40, (1, 10))
        ref = torch.log_softmax(model(x).logits[0].float(), -1)
        got = log_softmax_head(model, hidden_states(model, x)[0])
    assert torch.allclose(got, ref, atol=1e-5)
    check_head_path(model)


def test_an_unknown_logit_transform_is_refused(tiny_teacher):
    from transformers import AutoModelForCausalLM

    from ar2mdm.precompute.forward import check_head_path
    from ar2mdm.shared.errors import UserError

    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    check_head_path(model)
    forward = model.forward

    def scaled(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    with pytest.raises(UserError, match="unknown logit scaling"):
        check_head_path(model)


@pytest.mark.parametrize("device", DEVICES)
@torch.no_grad()
def test_the_flex_attention_tree_mask_scores_as_the_dense_one(device):
    """tree_mask "flex" (FlexAttention block mask; for CUDA) against the dense 4-D mask, rows of several segments."""
    model = tiny_llama(V, seed=3).to(device)
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, V, (2, 40), generator=g).to(device)
    positions = [torch.arange(1, 40, 3), torch.tensor([2, 17, 30, 39])]
    dense_res = hf_rescore(model, x, positions, k=3, window=6, token_budget=256)
    flex_res = hf_rescore(model, x, positions, k=3, window=6, token_budget=256, tree_mask="flex")
    for (cd, ld), (cf, lf) in zip(dense_res, flex_res):
        assert torch.equal(cd, cf)
        torch.testing.assert_close(lf.exp(), ld.exp(), atol=1e-5, rtol=0)
    assert model.config._attn_implementation == "sdpa"  # switched back after the flex forward


def test_flex_batches_keep_to_a_few_compiled_shapes():
    """transformers compiles flex_attention per shape and torch gives up after 8: a build's flex batches have one
    padded length and power-of-two row counts, cover every segment once, and stay within the budget's rows."""
    from ar2mdm.precompute.tree import FLEX_TILE, flex_batches

    g = np.random.default_rng(0)
    for budget, per in ((65536, 64), (50000, 48)):
        shapes = set()
        for calls in range(50):
            lengths = g.integers(20, 1025, size=int(g.integers(1, 300))).tolist()
            batches, S, rows = flex_batches(lengths, budget, 1024)
            assert S == 1024 and S % FLEX_TILE == 0
            assert sorted(j for b in batches for j in b) == list(range(len(lengths)))
            for b, n in zip(batches, rows):
                assert len(b) <= n <= per and ((n & (n - 1)) == 0 or n == per)
                shapes.add((n, S))
        assert len(shapes) <= 8, shapes
    assert flex_batches([1500, 30], 4096, 1024)[1] == 1536  # a longer segment than the usual sets S


def test_the_vectorised_packing_equals_the_per_branch_loop():
    """`pack_segment` builds every branch's block at once; the loop it replaced is the reference: the same
    tokens, positions, mask bounds, targets and output slots, for segments with blocks of length 1 to W and a
    branch at the last position."""
    import dataclasses

    from ar2mdm.precompute.topk import Branch
    from ar2mdm.precompute.tree import _segments, pack_segment
    from tests.precompute.reference import pack_segment_loop

    g = torch.Generator().manual_seed(3)
    L, W = 40, 6
    x = torch.randint(0, 100, (L,), generator=g)
    pos = sorted(set(torch.randint(1, L - 1, (15,), generator=g).tolist()) | {L - 2})
    brs = [
        Branch(0, i, int(torch.randint(0, 100, (1,), generator=g)), min(L - 1 - i, W), 3 * j + c)
        for j, i in enumerate(pos)
        for c in range(3)
    ]
    segs = _segments(brs, 60)
    assert len(segs) > 2
    for seg in segs:
        got, ref = pack_segment(x, seg), pack_segment_loop(x, seg)
        for f in dataclasses.fields(ref):
            a, b = getattr(got, f.name), getattr(ref, f.name)
            assert (torch.equal(a, b) and a.dtype == b.dtype) if isinstance(b, torch.Tensor) else a == b, f.name
