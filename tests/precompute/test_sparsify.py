"""RS-KD sampled sparse targets: unbiased for the dense target, and so is the KD gradient."""

import numpy as np
import pytest
import torch

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.sparsify import sample_sparse
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.shards import read_shard
from ar2mdm.shared.validate import validate_dir


def dense(ids, lps, V):
    q = np.zeros(V)
    np.add.at(q, ids, np.exp(lps.astype(np.float64)))
    return q


@pytest.mark.parametrize("mass", [1.0, 0.85])
def test_sampled_targets_are_unbiased_for_the_dense_target(mass):
    V, S, draws = 12, 16, 20000
    g = torch.Generator().manual_seed(0)
    q = torch.softmax(torch.randn(V, generator=g) * 2, 0).double() * mass
    ids = torch.randperm(V, generator=g)  # stored ids are not 0..V-1 in order
    logq = q[ids].log()
    logq[-1] = -torch.inf  # a slot that must never be drawn
    q_true = np.zeros(V)
    q_true[ids[:-1].numpy()] = q[ids[:-1]].numpy()
    acc = np.zeros(V)
    for _ in range(draws):
        i, lp = sample_sparse(ids, logq, S, g)
        assert len(i) <= S and len(set(i.tolist())) == len(i)
        one = dense(i, lp, V)
        assert one.sum() == pytest.approx(q_true.sum(), rel=1e-5)  # sums to the support's mass, exactly
        assert np.allclose(one / q_true.sum() * S, np.round(one / q_true.sum() * S), atol=1e-3)  # counts / S
        acc += one
    mean = acc / draws
    assert mean[ids[-1].item()] == 0
    se = np.sqrt(q_true * (q_true.sum() - q_true) / (S * draws))  # per-entry standard error of the mean
    assert (np.abs(mean - q_true) <= 5 * se + 1e-9).all(), np.abs(mean - q_true).max()
    # top-N of the same size is biased: it drops the tail and renormalises the head
    top = np.sort(q_true)[::-1][:4]
    assert abs(top.sum() - q_true.sum()) > 0.05


def test_the_kd_gradient_on_sampled_targets_is_unbiased():
    from ar2mdm.train.losses import sparse_kl

    V, S, draws = 10, 8, 4000
    g = torch.Generator().manual_seed(1)
    q = torch.softmax(torch.randn(V, generator=g) * 1.5, 0)
    z = torch.randn(1, V, generator=g, requires_grad=True)
    dense_loss = sparse_kl(torch.log_softmax(z, -1), torch.arange(V)[None], q.log()[None], 1.0, "renormalize")
    (g_dense,) = torch.autograd.grad(dense_loss.sum(), z)
    acc = torch.zeros_like(z)
    for _ in range(draws):
        i, lp = sample_sparse(torch.arange(V), q.log(), S, g)
        loss = sparse_kl(
            torch.log_softmax(z, -1), torch.as_tensor(i)[None].long(), torch.as_tensor(lp)[None], 1.0, "renormalize"
        )
        acc += torch.autograd.grad(loss.sum(), z)[0]
    assert torch.allclose(acc / draws, g_dense, atol=0.01), (acc / draws - g_dense).abs().max()


def test_a_sampled_topk_build_draws_from_the_candidates_and_resumes_identically(tiny_corpus, tiny_teacher, tmp_path):
    kw = dict(
        corpus=str(tiny_corpus),
        teacher=str(tiny_teacher),
        seq_len=24,
        k=3,
        window=4,
        seqs_per_shard=2,
        max_sequences=4,
        progress=False,
        logprob_dtype="float32",
    )
    run_build(BuildConfig(out=str(tmp_path / "top"), top_n=4, **kw))  # top-4 of the K+1 = 4 candidates: all of them
    run_build(BuildConfig(out=str(tmp_path / "s"), sparsify="sample", draws=8, **kw))
    run_build(BuildConfig(out=str(tmp_path / "s2"), sparsify="sample", draws=8, **kw))
    m = validate_dir(tmp_path / "s")
    assert m.params["sparsify"] == "sample" and m.params["draws"] == 8
    for info in m.shards:
        a, b = read_shard(tmp_path / "s" / info.file), read_shard(tmp_path / "s2" / info.file)
        ref = read_shard(tmp_path / "top" / info.file)
        np.testing.assert_array_equal(a.target_ids, b.target_ids)  # seeded per sequence: reproducible
        for p in range(a.num_targets):
            ids = a.target_ids[a.entry_offsets[p] : a.entry_offsets[p + 1]]
            q = np.exp(a.target_logprobs[a.entry_offsets[p] : a.entry_offsets[p + 1]].astype(np.float64))
            cand = set(ref.target_ids[ref.entry_offsets[p] : ref.entry_offsets[p + 1]].tolist())
            assert set(ids.tolist()) <= cand and q.sum() == pytest.approx(1.0, abs=1e-6)
            np.testing.assert_allclose(q * 8, np.round(q * 8), atol=1e-4)
    from ar2mdm.train.config import TrainConfig
    from ar2mdm.train.loop import run_training

    with pytest.raises(UserError, match="sampled targets"):
        run_training(
            TrainConfig(
                shards=str(tmp_path / "s"),
                out=str(tmp_path / "run"),
                student="tiny",
                temperature=2.0,
                steps=1,
                progress=False,
            )
        )
    res = run_training(
        TrainConfig(
            shards=str(tmp_path / "s"), out=str(tmp_path / "run"), student="tiny", steps=2, batch_size=2, progress=False
        )
    )
    assert res["steps"] == 2 and np.isfinite(res["kd"])
