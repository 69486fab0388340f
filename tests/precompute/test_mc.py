import itertools

import numpy as np
import pytest
import torch

from ar2mdm.precompute.decode import TorchDecoder
from ar2mdm.precompute.mc.estimators import mc_targets
from ar2mdm.precompute.mc.particles import McSettings, sample_particles
from tests.tiny import tiny_llama

V = 8
L = 6


def one_row(model, x, masked, seed=0, **settings):
    """mc targets of one row (a batch of one), settings by McSettings' names."""
    return mc_targets(model, x[None], [np.asarray(masked)], [seed], McSettings(**settings))[0]


def particles_of(model, x, masked, K, seed=0, **settings):
    """(seqs (K, L), logw (K,), next ids (P, K, m), next probs (P, K, m), ESS before each resampling) of one row."""
    s = McSettings(k=K, weights=settings.pop("weights", "importance"), **settings)
    p = sample_particles(TorchDecoder(model), x[None], [np.asarray(masked)], [seed], s)
    ess_before = [float(e) for e in p.ess_at[0] if not torch.isnan(e)]
    return p.seqs, p.logw[0], p.top_ids.transpose(0, 1).long(), p.top_probs.transpose(0, 1), ess_before


def tv(p, q):
    return 0.5 * float((p - q).abs().sum())


def dense(ids, logprobs, vocab=V):
    out = torch.zeros(vocab, dtype=torch.float64)
    out[ids.long()] = logprobs.double().exp()
    return out


@torch.no_grad()
def exact_limits(model, x, masked, V=V):
    """The four limits of the MC estimators, by enumerating every completion of the masked positions."""
    Z = list(itertools.product(range(V), repeat=len(masked)))
    ys = x.repeat(len(Z), 1)
    for n, z in enumerate(Z):
        ys[n, masked] = torch.tensor(z)
    lp = torch.log_softmax(model(ys).logits.double(), -1)  # (Z, L, V)
    tok = lp[:, :-1].gather(2, ys[:, 1:, None])[..., 0]  # (Z, L-1): log p(y_j | y_<j) at j = 1..L-1
    first = masked[0]
    log_sampler = tok[:, [j - 1 for j in masked]].sum(1)  # the sampler draws only the masked tokens
    log_joint = tok[:, first - 1 :].sum(1)  # everything from the first masked position on
    q_s, post = log_sampler.exp(), torch.softmax(log_joint, 0)
    joint_grid = log_joint.view(*([V] * len(masked)))
    out = {}
    for a, i in enumerate(masked):
        nxt = lp[:, i - 1].exp()  # (Z, V) p(. | y_<i)
        # P(x_i = v | y_-i) for every z and v: softmax over axis a, then read v along that axis
        sm = torch.softmax(joint_grid, dim=a)
        full = torch.stack([sm.select(a, v).unsqueeze(a).expand_as(sm).reshape(-1) for v in range(V)], -1)  # (Z, V)
        out[i] = {
            ("uniform", "next-token"): (q_s[:, None] * nxt).sum(0),
            ("importance", "next-token"): (post[:, None] * nxt).sum(0),
            ("uniform", "full-conditional"): (q_s[:, None] * full).sum(0),
            ("importance", "full-conditional"): (post[:, None] * full).sum(0),
        }
    return out


@pytest.mark.parametrize(
    "weights,score",
    [
        ("uniform", "next-token"),
        ("importance", "next-token"),
        ("uniform", "full-conditional"),
        ("importance", "full-conditional"),
    ],
)
def test_each_estimator_converges_to_its_own_limit(weights, score):
    model = tiny_llama(V, seed=5, sharpness=4.0)
    x = torch.tensor([1, 3, 0, 5, 0, 2])
    masked = [2, 4]
    limits = exact_limits(model, x, masked)
    K = 4000 if score == "next-token" else 1500
    est = one_row(model, x, masked, 0, k=K, score=score, weights=weights, top_n=V, rescore_k=V)
    if weights == "uniform":
        assert est.ess == pytest.approx(K)
    else:
        assert 1 <= est.ess < K
    differing = 0
    for p, i in enumerate(masked):
        got = dense(est.ids[p], est.logprobs[p])
        own = limits[i][(weights, score)]
        assert tv(got, own) < 0.03, (i, tv(got, own))
        for key, other in limits[i].items():
            if key != (weights, score) and tv(own, other) > 0.08:
                differing += 1
                assert tv(got, own) < tv(got, other), (i, key)
    assert differing >= 2  # the limits do differ here, so the test can tell the estimators apart


def test_three_masked_positions_posterior_marginal():
    model = tiny_llama(V, seed=7, sharpness=3.0)
    x = torch.tensor([1, 0, 4, 0, 0, 6])
    masked = [1, 3, 4]
    limits = exact_limits(model, x, masked)
    est = one_row(model, x, masked, 1, k=1500, score="full-conditional", weights="importance", top_n=V, rescore_k=V)
    for p, i in enumerate(masked):
        assert tv(dense(est.ids[p], est.logprobs[p]), limits[i][("importance", "full-conditional")]) < 0.04


@torch.no_grad()
def test_completions_keep_visible_tokens_and_weights_match_a_direct_computation():
    model = tiny_llama(V, seed=2, sharpness=4.0)
    x = torch.tensor([1, 2, 0, 0, 3, 4, 0, 5])
    masked = [2, 3, 6]
    seqs, logw, next_ids, next_probs, _ = particles_of(model, x, masked, 16)
    visible = [j for j in range(len(x)) if j not in masked]
    assert torch.equal(seqs[:, visible], x[visible].repeat(16, 1))
    lp = torch.log_softmax(model(seqs).logits.double(), -1)
    vis_after = [j for j in visible if j > masked[0]]
    direct = sum(lp[:, j - 1].gather(1, seqs[:, j : j + 1])[:, 0] for j in vis_after)
    assert torch.allclose(logw, direct, atol=1e-4)
    for p, i in enumerate(masked):  # the recorded next-token scores are p(.|x_<i) of each completion
        ref = lp[:, i - 1].exp()
        got = torch.zeros_like(ref).scatter_(1, next_ids[p], next_probs[p].double())
        assert torch.allclose(got, ref, atol=1e-5)


def test_seeded_runs_reproduce_and_sums_stay_below_one():
    model = tiny_llama(V, seed=3)
    x = torch.tensor([1, 0, 2, 0, 4, 5])
    a = one_row(model, x, [1, 3], 9, k=8, score="next-token", weights="importance", top_n=4)
    b = one_row(model, x, [1, 3], 9, k=8, score="next-token", weights="importance", top_n=4)
    for p in range(2):
        assert torch.equal(a.ids[p], b.ids[p]) and torch.equal(a.logprobs[p], b.logprobs[p])
        assert float(a.logprobs[p].exp().sum()) <= 1 + 1e-9


def test_both_backends_keep_the_same_next_token_entries_for_large_top_n(tmp_path):
    """vLLM's engine must allow as many log-probs as the torch backend keeps (vLLM's default caps them at 64)."""
    from ar2mdm.precompute.build import engine_max_logprobs
    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.mc.particles import next_token_keep
    from ar2mdm.precompute.targets import support_size

    for top_n in (8, 16, 32, 100):
        cfg = BuildConfig(corpus=str(tmp_path), out=str(tmp_path / "o"), mode="mc", top_n=top_n)
        assert engine_max_logprobs(cfg) >= next_token_keep(top_n) == max(64, 4 * top_n)
        cfg = BuildConfig(corpus=str(tmp_path), out=str(tmp_path / "o"), mode="mc", top_n=top_n, sparsify="sample")
        assert engine_max_logprobs(cfg) >= next_token_keep(support_size(cfg))  # sampling keeps a wider support


# ---------------------------------------------------------------------------------------------------- smc

SMC_ROW = torch.tensor([1, 3, 0, 5, 0, 2, 0, 4])
SMC_MASKED = [2, 4, 6]  # visible runs at 3 and 5 are resampling points (a masked position follows); 7 is not


def test_smc_that_never_resamples_is_importance_sampling_draw_for_draw():
    model = tiny_llama(V, seed=5, sharpness=4.0)
    for score in ("next-token", "full-conditional"):
        a = one_row(model, SMC_ROW, SMC_MASKED, 4, k=32, score=score, weights="importance", top_n=V)
        b = one_row(model, SMC_ROW, SMC_MASKED, 4, k=32, score=score, weights="smc", top_n=V, smc_ess=0.0)
        assert b.ess_before == [] and a.ess == b.ess
        for p in range(len(SMC_MASKED)):
            assert torch.equal(a.ids[p], b.ids[p]) and torch.equal(a.logprobs[p], b.logprobs[p])


@torch.no_grad()
def test_smc_particles_carry_their_ancestry():
    """After forced resampling at every visible run, each final particle's recorded next-token scores are its own
    prefix's distributions, and its log-weight covers exactly the visible tokens after the last resampling."""
    model = tiny_llama(V, seed=2, sharpness=4.0)
    seqs, logw, next_ids, next_probs, ess_before = particles_of(
        model, SMC_ROW, SMC_MASKED, 64, weights="smc", smc_ess=1.0
    )
    assert len(ess_before) == 2 and all(1 <= e < 64 for e in ess_before)
    assert len({tuple(s) for s in seqs[:, :4].tolist()}) < 64  # resampling made particles share prefixes
    assert torch.equal(seqs[:, [0, 1, 3, 5, 7]], SMC_ROW[[0, 1, 3, 5, 7]].repeat(64, 1))
    lp = torch.log_softmax(model(seqs).logits.double(), -1)
    for p, i in enumerate(SMC_MASKED):
        got = torch.zeros(64, V).scatter_(1, next_ids[p], next_probs[p].float())
        assert torch.allclose(got, lp[:, i - 1].exp().float(), atol=1e-5), i
    assert torch.allclose(logw, lp[:, 6].gather(1, seqs[:, 7:8])[:, 0], atol=1e-4)  # x_7 after the last one


def test_systematic_resampling_copies_each_particle_floor_or_ceil_of_K_w_times():
    from ar2mdm.precompute.mc.particles import systematic_resample

    w = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    u0 = torch.tensor([0.0, 0.3, 0.77, 0.999], dtype=torch.float64)
    for a in systematic_resample(w.log().expand(4, -1), u0):  # four rows at once, one offset each
        counts = torch.bincount(a, minlength=4).double()
        assert (counts >= torch.floor(4 * w)).all() and (counts <= torch.ceil(4 * w)).all() and counts.sum() == 4
        assert torch.equal(a, a.sort().values)
    anc = systematic_resample(w.log().expand(4000, -1), torch.rand(4000, dtype=torch.float64))  # (4000, 4)
    mean = torch.stack([torch.bincount(a, minlength=4) for a in anc])
    assert torch.allclose(mean.double().mean(0) / 4, w, atol=0.01)  # unbiased: E[count] = K·w


@pytest.mark.parametrize("score,smc_ess", [("next-token", 0.9), ("next-token", 1.0), ("full-conditional", 1.0)])
def test_smc_converges_to_the_importance_limit(score, smc_ess):
    """smc targets the same limit as importance (docs/mc.md): the posterior marginal with full-conditional."""
    model = tiny_llama(V, seed=5, sharpness=4.0)
    limits = exact_limits(model, SMC_ROW, SMC_MASKED)
    K = 4000 if score == "next-token" else 1500
    est = one_row(model, SMC_ROW, SMC_MASKED, 0, k=K, score=score, weights="smc", top_n=V, rescore_k=V, smc_ess=smc_ess)
    assert 1 <= len(est.ess_before) <= 2 and (len(est.ess_before) == 2 or smc_ess < 1)  # 2 = every visible run
    differing = 0
    for p, i in enumerate(SMC_MASKED):
        got = dense(est.ids[p], est.logprobs[p])
        own = limits[i][("importance", score)]
        assert tv(got, own) < 0.03, (i, tv(got, own))
        for key, other in limits[i].items():
            if key[0] == "uniform" and tv(own, other) > 0.08:
                differing += 1
                assert tv(got, own) < tv(got, other), (i, key)
    assert differing >= 1
