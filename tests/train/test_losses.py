import pytest
import torch

from ar2mdm.train.losses import combined_loss, kd_loss, mdm_loss, sparse_kl, student_logprobs


def dense_kl(logits, q_dense, T):
    """T²·KL(q_T ‖ softmax(z/T)) with q_T ∝ q^(1/T) over the full vocabulary."""
    logq = torch.log_softmax(torch.log(q_dense) / T, -1)
    logp = torch.log_softmax(logits / T, -1)
    return T * T * (logq.exp() * (logq - logp)).sum(-1)


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_sparse_kl_equals_dense_kl_on_full_support(T, tail):
    g = torch.Generator().manual_seed(0)
    K, V = 6, 11
    logits = torch.randn(K, V, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(torch.randn(K, V, generator=g, dtype=torch.float64) * 2, -1)
    perm = torch.stack([torch.randperm(V, generator=g) for _ in range(K)])  # support in any order
    sparse = sparse_kl(student_logprobs(logits, T), perm, torch.log(q).gather(1, perm), T, tail)
    assert torch.allclose(sparse.double(), dense_kl(logits, q, T), atol=1e-5)


def test_bucket_tail_equals_dense_kl_with_an_aggregated_category():
    g = torch.Generator().manual_seed(1)
    V, S = 9, 4
    logits = torch.randn(1, V, generator=g, dtype=torch.float64)
    q = torch.softmax(torch.randn(1, V, generator=g, dtype=torch.float64), -1)
    ids = torch.arange(S)[None]
    got = sparse_kl(student_logprobs(logits), ids, torch.log(q[:, :S]), 1.0, "bucket")
    p = torch.softmax(logits, -1)
    qa = torch.cat([q[:, :S], q[:, S:].sum(-1, keepdim=True)], -1)
    pa = torch.cat([p[:, :S], p[:, S:].sum(-1, keepdim=True)], -1)
    assert torch.allclose(got.double(), (qa * (qa / pa).log()).sum(-1), atol=1e-6)
    # renormalize ignores the tail: KL of the support-renormalised q against p over the support
    ren = sparse_kl(student_logprobs(logits), ids, torch.log(q[:, :S]), 1.0, "renormalize")
    qs = q[:, :S] / q[:, :S].sum()
    assert torch.allclose(ren.double(), (qs * (qs.log() - p[:, :S].log())).sum(-1), atol=1e-6)


def test_padding_entries_are_ignored():
    logits = torch.randn(2, 7, dtype=torch.float64)
    ids = torch.tensor([[1, 3, 0], [2, 0, 0]])
    lp = torch.log(torch.tensor([[0.6, 0.4, 0.0], [1.0, 0.0, 0.0]], dtype=torch.float64))
    logp = student_logprobs(logits)
    full = sparse_kl(logp, ids, lp, 1.0, "renormalize")
    one = sparse_kl(logp[1:], ids[1:, :1], lp[1:, :1], 1.0, "renormalize")
    assert torch.isfinite(full).all() and torch.allclose(full[1], one[0])


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_gradcheck_sparse_kl(tail):
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[0, 2, 5], [1, 3, 0], [4, 5, 2]])
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.1], [0.7, 0.2, 0.05], [0.4, 0.4, 0.1]], dtype=torch.float64))
    assert torch.autograd.gradcheck(lambda z: sparse_kl(student_logprobs(z, 1.7), ids, lp, 1.7, tail), (logits,), eps=1e-6, atol=1e-5)


def test_gradcheck_mdm():
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([0, 3, 1, 4])
    row = torch.tensor([0, 0, 1, 1])
    norm = torch.tensor([8.0, 5.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    import torch.nn.functional as F

    ref = lambda z: ((F.cross_entropy(z, tgt, reduction="none").view(2, 2).sum(1)) * w / norm).mean()  # noqa: E731
    assert torch.allclose(mdm_loss(student_logprobs(z), tgt, row, norm, w), ref(z), atol=1e-10)
    assert torch.autograd.gradcheck(lambda z: mdm_loss(student_logprobs(z), tgt, row, norm, w), (z,))


def test_lambda_endpoints_reduce_to_pure_losses():
    a, b = torch.tensor(2.0, requires_grad=True), torch.tensor(5.0, requires_grad=True)
    assert combined_loss(a, b, 0.0) is a
    assert combined_loss(a, b, 1.0) is b
    assert combined_loss(a, None, 0.0) is a and combined_loss(None, b, 1.0) is b
    assert float(combined_loss(a, b, 0.25).detach()) == pytest.approx(0.75 * 2 + 0.25 * 5)


def test_kd_loss_normalises_per_row_and_skips_positions_without_target():
    logits = torch.randn(3, 5)
    ids = torch.tensor([[1, 2], [0, 0], [3, 4]])
    lp = torch.log(torch.tensor([[0.5, 0.5], [0.0, 0.0], [0.9, 0.1]]))
    row = torch.tensor([0, 0, 1])
    norm = torch.tensor([10.0, 4.0])
    logp = student_logprobs(logits)
    per = sparse_kl(logp, ids, lp, 1.0, "renormalize")
    got = kd_loss(logp, ids, lp, row, norm, 1.0)
    assert torch.allclose(got, (per[0] / 10 + per[2] / 4) / 2)
