import pytest
import torch

from ar2mdm.train.losses import (
    SparseTargets,
    combined_loss,
    kd_loss,
    masked_losses,
    mdm_loss,
    sparse_kl,
    student_logprobs,
)


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
    sparse = sparse_kl(student_logprobs(logits), perm, torch.log(q).gather(1, perm), T, tail)
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
    assert torch.autograd.gradcheck(
        lambda z: sparse_kl(student_logprobs(z), ids, lp, 1.7, tail), (logits,), eps=1e-6, atol=1e-5
    )


def test_gradcheck_mdm():
    z = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    tgt = torch.tensor([0, 3, 1, 4])
    row = torch.tensor([0, 0, 1, 1])
    norm = torch.tensor([8.0, 5.0], dtype=torch.float64)
    w = torch.tensor([1.0, 2.0], dtype=torch.float64)
    import torch.nn.functional as F

    ref = lambda z: ((F.cross_entropy(z, tgt, reduction="none").view(2, 2).sum(1)) * w / norm).mean()  # noqa: E731

    def ours(z):
        return mdm_loss(masked_losses(z, tgt, None)[0], row, norm, w[row])

    assert torch.allclose(ours(z), ref(z), atol=1e-10)
    assert torch.autograd.gradcheck(ours, (z,))


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
    got = kd_loss(masked_losses(logits, ids[:, 0], SparseTargets(ids, lp, 1.0, "renormalize"))[1], row, norm)
    assert torch.allclose(got, (per[0] / 10 + per[2] / 4) / 2)


@pytest.mark.parametrize("T", [1.0, 1.7])
@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_chunked_masked_losses_equal_one_chunk_in_value_and_gradient(T, tail):
    """In chunks (the float32 work recomputed in the backward), both terms and the logits' gradient equal the
    one-chunk path, including chunks that hold positions without a target and a chunk shorter than the rest."""
    g = torch.Generator().manual_seed(7)
    M, V, N = 11, 13, 4
    z = torch.randn(M, V, generator=g, dtype=torch.float64) * 2
    tokens = torch.randint(0, V, (M,), generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:N] for _ in range(M)])
    lp = torch.log_softmax(torch.randn(M, N, generator=g, dtype=torch.float64), -1) - 0.2  # a tail of mass
    lp[3] = -torch.inf  # no target at position 3
    lp[5, 2:] = -torch.inf  # padding
    tgt = SparseTargets(ids, lp, T, tail, torch.full((M,), 1e-6, dtype=torch.float64) if tail == "bucket" else None)
    coef_nll, coef_kl = torch.rand(M, generator=g, dtype=torch.float64), torch.rand(M, generator=g, dtype=torch.float64)
    got = {}
    for chunk in (M, 4, 1):
        x = z.clone().requires_grad_(True)
        nll, kl = masked_losses(x, tokens, tgt, chunk=chunk)
        ((coef_nll * nll).sum() + (coef_kl * kl).sum()).backward()
        got[chunk] = (nll.detach(), kl.detach(), x.grad)
    for chunk in (4, 1):
        for a, b in zip(got[M], got[chunk]):
            assert torch.allclose(a, b, atol=1e-12, rtol=0)
    assert got[M][1][3] == 0 and torch.all(got[M][2][3] != 0)  # the MDM term still trains position 3


def test_chunked_masked_losses_keep_no_float32_vocabulary_tensor_for_the_backward():
    """What the chunks are for: the tensors autograd keeps are the logits and a few (M,) or (M, N) ones, not
    the (M, V) float32 log-softmax that one chunk keeps."""
    M, V, N = 64, 1000, 8
    z = torch.randn(M, V, dtype=torch.bfloat16, requires_grad=True)
    ids = torch.randint(0, V, (M, N))
    tgt = SparseTargets(ids, torch.log_softmax(torch.randn(M, N), -1), 1.0, "renormalize")

    def kept(chunk):
        sizes = []

        def pack(t):
            sizes.append((t.dtype, t.numel()))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            masked_losses(z, ids[:, 0], tgt, chunk=chunk)
        return [s for s in sizes if s[0] == torch.float32 and s[1] >= M * V // 4]

    assert kept(M)  # one chunk: the float32 (M, V) log-softmax is kept
    assert not kept(16)


# ---- numerics: no NaN, a tail within the storage precision, one tempering of the tail, forced-mask weights

from ar2mdm.shared.shards import to_float16_down  # noqa: E402
from ar2mdm.train.losses import _log1mexp, elbo_weight, storage_slack  # noqa: E402


def test_log1mexp_has_finite_gradients_where_exp_rounds_to_one():
    x = torch.tensor([-3e-8, -1e-9, -1e-12, -1e-3, -0.5, -0.7, -5.0, -50.0], requires_grad=True)
    y = _log1mexp(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    ref = torch.log(-torch.expm1(x.detach().double()))
    assert torch.allclose(y.double(), ref, rtol=1e-5)


@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_bucket_gradient_is_finite_for_a_confident_student(dtype, T):
    """A student that puts all but ~1e-8 of its mass on the stored support (logit scale 15): no NaN anywhere."""
    g = torch.Generator().manual_seed(0)
    K, V, N = 512, 64, 8
    base = torch.randn(K, V, generator=g) * 15
    # and rows whose mass outside the top-N sweeps 1e-5 .. 1e-13, where exp(log-mass) rounds to 1 in float32
    gap = torch.full((K, V), 0.0)
    gap[:, N:] = -torch.linspace(15, 70, K)[:, None]
    base[K // 2 :] = gap[K // 2 :]
    logits = base.to(dtype).requires_grad_()
    ids = logits.detach().float().topk(N, -1).indices
    q = torch.softmax(torch.randn(K, N, generator=g), -1) * 0.97  # a real tail of 3%
    kl = sparse_kl(student_logprobs(logits), ids, q.log(), T, "bucket")
    kl.sum().backward()
    assert torch.isfinite(kl).all() and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("tail", ["renormalize", "bucket"])
def test_positions_without_any_target_have_zero_loss_and_gradient(tail):
    logits = torch.randn(2, 6, requires_grad=True)
    ids = torch.tensor([[1, 2], [0, 0]])
    lp = torch.tensor([[-0.5, -1.0], [float("-inf"), float("-inf")]])
    kl = sparse_kl(student_logprobs(logits), ids, lp, 2.0, tail)
    kl.sum().backward()
    assert kl[1] == 0 and torch.isfinite(logits.grad).all() and torch.all(logits.grad[1] == 0)


def test_float16_rounding_is_not_a_tail():
    """Exact-support targets stored in float16 (rounded down) leave a leftover of ~1e-4: no tail category."""
    g = torch.Generator().manual_seed(3)
    K, V, N = 64, 20, 5
    q = torch.softmax(torch.randn(K, N, generator=g, dtype=torch.float64) * 2, -1)  # sums to 1: exact support
    stored = torch.from_numpy(to_float16_down(q.log().numpy()).astype("float32"))
    leftover = 1 - stored.double().exp().sum(-1)
    assert leftover.max() > 1e-5  # rounding, which is no mass
    slack = storage_slack(stored, "float16")
    assert torch.all(leftover <= slack.double())  # the bound holds for every position
    logits = torch.randn(K, V, generator=g)
    ids = torch.stack([torch.randperm(V, generator=g)[:N] for _ in range(K)])
    logp = student_logprobs(logits)
    for T in (2.0, 4.0):
        exact = sparse_kl(logp.double(), ids, q.log(), T, "bucket", slack=torch.full((K,), 1e-9))
        got = sparse_kl(logp, ids, stored, T, "bucket", slack=slack)
        old = sparse_kl(logp, ids, stored, T, "bucket")  # the fixed 1e-6 cutoff keeps a fake tail
        assert torch.allclose(got.double(), exact, atol=2e-3 * T * T)
        assert (old.double() - exact).abs().max() > 10 * (got.double() - exact).abs().max()
    # a real tail (1% of the mass) is far above the slack and is kept
    real = stored + torch.log(torch.tensor(0.99))
    assert torch.all(1 - real.double().exp().sum(-1) > storage_slack(real, "float16").double())


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_bucket_tail_is_the_coarse_grained_then_tempered_kl(T):
    """docs/design.md: coarse-grain q and p to S ∪ {rest} at T = 1, then temper both alike."""
    g = torch.Generator().manual_seed(4)
    K, V, N = 8, 30, 6
    logits = torch.randn(K, V, generator=g, dtype=torch.float64) * 2
    q = torch.softmax(torch.randn(K, V, generator=g, dtype=torch.float64) * 2, -1)  # dense teacher, known tail
    ids = q.topk(N, -1).indices
    got = sparse_kl(student_logprobs(logits), ids, q.gather(1, ids).log(), T, "bucket", slack=torch.zeros(K))
    p = torch.softmax(logits, -1)
    qa = torch.cat([q.gather(1, ids), 1 - q.gather(1, ids).sum(-1, keepdim=True)], -1)  # (K, N+1)
    pa = torch.cat([p.gather(1, ids), 1 - p.gather(1, ids).sum(-1, keepdim=True)], -1)
    qt = qa ** (1 / T) / (qa ** (1 / T)).sum(-1, keepdim=True)
    pt = pa ** (1 / T) / (pa ** (1 / T)).sum(-1, keepdim=True)
    assert torch.allclose(got, T * T * (qt * (qt / pt).log()).sum(-1), atol=1e-8)


def _exact_mdm_elbo_expectation(n, nll, weight_fn, eps=1e-3, grid=20001):
    """E_{t ~ U(eps,1), m ~ masks with the forced position} [ w(t, m) Σ_{i∈m} nll_i ] by quadrature + enumeration."""
    import itertools

    t = torch.linspace(eps, 1, grid, dtype=torch.float64)
    total = torch.zeros_like(t)
    for bits in itertools.product([0, 1], repeat=n):
        m = torch.tensor(bits, dtype=torch.bool)
        k = int(m.sum())
        if k == 0:
            continue
        p = t**k * (1 - t) ** (n - k) + ((1 - t) ** n / n if k == 1 else 0)  # the forced draw lands here too
        w = weight_fn(t, torch.full_like(t, k))
        total += p * w * float(nll[m].sum())
    return float(torch.trapezoid(total, t) / (1 - eps))


def test_elbo_weight_is_unbiased_with_forced_masks():
    n = 4
    nll = torch.tensor([0.3, 1.7, 2.2, 0.9], dtype=torch.float64)
    target = float(nll.sum())  # E_t[(1/t) Σ_{i} t·nll_i] over the i.i.d. masks = Σ nll_i

    def ours(t, k):  # the weight of each row's first position (every position of a row has its row's)
        mask = torch.zeros(len(t), n, dtype=torch.bool)
        for r, kk in enumerate(k.long().tolist()):
            mask[r, :kk] = True
        return elbo_weight(t, torch.arange(len(t)), mask, torch.ones(len(t), n, dtype=torch.bool))

    assert _exact_mdm_elbo_expectation(n, nll, ours) == pytest.approx(target, rel=1e-3)
    naive = _exact_mdm_elbo_expectation(n, nll, lambda t, k: 1 / t)  # 1/t on the forced rows: biased up
    assert naive > target * 1.2
    w = ours(torch.tensor([1e-3, 0.5]), torch.tensor([1.0, 1.0]))
    assert float(w.max()) <= n  # bounded where 1/t reached 1/eps


def test_elbo_weight_of_block_rows_is_unbiased_with_forced_masks():
    """Two blocks of two positions, each block masked at its own t (independent, uniform), one position forced
    where the draw masks none: E[Σ_{i masked} w_i·nll_i] = Σ nll_i, by exact enumeration of the masks on a grid of
    (t1, t2). 1/t of the block alone is biased up by the forced masks."""
    import itertools

    nll = torch.tensor([0.3, 1.7, 2.2, 0.9], dtype=torch.float64)
    grid = torch.linspace(1e-3, 1.0, 401, dtype=torch.float64)
    t1, t2 = torch.meshgrid(grid, grid, indexing="ij")
    tb = torch.stack([t1, t1, t2, t2], -1).reshape(-1, 4)  # (G, 4): each position's block t
    ours = torch.zeros(len(tb), dtype=torch.float64)
    naive = torch.zeros_like(ours)
    for bits in itertools.product([0, 1], repeat=4):
        m = torch.tensor(bits, dtype=torch.bool)
        p = torch.where(m, tb, 1 - tb).prod(-1)  # (G,) the i.i.d. draw
        if m.sum() == 1:
            p = p + (1 - tb).prod(-1) / 4  # the forced draw lands here too
        if not m.any():
            continue
        mask = m.expand(len(tb), 4)
        for i in m.nonzero()[:, 0].tolist():
            w = elbo_weight(tb[:, i], torch.arange(len(tb)), mask, torch.ones(len(tb), 4, dtype=torch.bool))
            ours += p * w * nll[i]
            naive += p / tb[:, i] * nll[i]
    mean = lambda v: float(torch.trapezoid(torch.trapezoid(v.view(401, 401), grid), grid)) / (1 - 1e-3) ** 2  # noqa: E731
    assert mean(ours) == pytest.approx(float(nll.sum()), rel=2e-3)
    assert mean(naive) > float(nll.sum()) * 1.1


def _rest_reference(logits: torch.Tensor, ids: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """log Σ_{v∉S} p(v) in float64 by brute force over the vocabulary, -inf where S covers it."""
    p = torch.softmax(logits.double(), -1)
    in_s = torch.zeros_like(p, dtype=torch.bool)
    for k in range(ids.shape[0]):
        in_s[k, ids[k][valid[k]]] = True
    return torch.log(p.masked_fill(in_s, 0.0).sum(-1))


def test_rest_logmass_routes_agree_with_brute_force_and_share_gradients():
    """Both routes of rest_logmass (1 - Σ_S p for diffuse rows; the summed complement for confident rows,
    repeated ids and S = V) equal the brute-force value, and give the logits the same gradient."""
    from ar2mdm.train.losses import COMPLEMENT_MAX_MASS, rest_logmass

    g = torch.Generator().manual_seed(3)
    K, V, N = 8, 40, 4
    logits = torch.randn(K, V, generator=g, dtype=torch.float64)
    ids = torch.stack([torch.randperm(V, generator=g)[:N] for _ in range(K)])
    valid = torch.ones(K, N, dtype=torch.bool)
    logits[1, ids[1]] += 8.0  # confident: Σ_S p > COMPLEMENT_MAX_MASS
    ids[2, 3] = ids[2, 0]  # a repeated id
    valid[3, 2:] = False  # padding
    ids[3, 2:] = ids[3, 0] + 0  # padding slots may hold anything, even a member of S
    ids5 = torch.cat([ids, ids[:, :1].expand(K, V - N)], 1)  # room for a row with S = V
    ids5[4] = torch.randperm(V, generator=g)
    valid5 = torch.cat([valid, torch.zeros(K, V - N, dtype=torch.bool)], 1)
    valid5[4] = True
    z = logits.clone().requires_grad_()
    logp = torch.log_softmax(z, -1)
    got, has = rest_logmass(logp, ids5, valid5, logp.gather(1, ids5))
    ref = _rest_reference(logits, ids5, valid5)
    assert has.tolist() == [k != 4 for k in range(K)]
    assert torch.equal(torch.isinf(got), torch.isinf(ref))
    fin = torch.isfinite(ref)
    assert torch.allclose(got[fin], ref[fin], atol=1e-12)
    p_in = torch.softmax(logits, -1).gather(1, ids).sum(-1)
    assert p_in[1] > COMPLEMENT_MAX_MASS and (p_in[[0, 5, 6, 7]] < COMPLEMENT_MAX_MASS).all()  # both routes ran
    (got[fin] * torch.arange(1.0, fin.sum() + 1, dtype=torch.float64)).sum().backward()
    zr = logits.clone().requires_grad_()
    ref2 = _rest_reference(zr, ids5, valid5)
    (ref2[fin] * torch.arange(1.0, fin.sum() + 1, dtype=torch.float64)).sum().backward()
    assert torch.allclose(z.grad, zr.grad, atol=1e-12)


def test_bucket_kl_at_a_real_vocabulary_size_is_as_accurate_as_the_log_softmax():
    """V = 49,152 in float32: the KD term's error against float64 stays at the log-softmax's own level."""
    g = torch.Generator().manual_seed(4)
    K, V, N = 32, 49_152, 16
    logits = torch.randn(K, V, generator=g) * 3
    logits[:, :N] += torch.linspace(0, 25, K)[:, None]  # from diffuse to confident rows on the stored ids
    ids = torch.stack([torch.randperm(N, generator=g) for _ in range(K)])
    q = torch.softmax(torch.randn(K, N, generator=g), -1) * 0.8  # a tail of 20%
    got = sparse_kl(student_logprobs(logits), ids, q.log(), 1.0, "bucket").double()
    exact = sparse_kl(student_logprobs(logits.double()), ids, q.double().log(), 1.0, "bucket")
    lsm_err = torch.logsumexp(student_logprobs(logits).double(), -1).abs().max()  # the log-softmax's own error
    assert (got - exact).abs().max() <= 2 * lsm_err + 1e-6
