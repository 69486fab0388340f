"""The particle sampler: a row's draws do not depend on which rows share its batch, the vectorised
pieces (inverse-CDF draws, systematic resampling over rows, the mixture) equal their plain definitions, and the
batched estimates converge to the exact limits (enumeration, tests/precompute/test_mc.py)."""

import numpy as np
import pytest
import torch

from ar2mdm.precompute.decode import TorchDecoder
from ar2mdm.precompute.mc.estimators import mc_targets, mixture
from ar2mdm.precompute.mc.particles import McSettings, row_uniforms, sample_particles
from tests.precompute.test_mc import dense, exact_limits, tv
from tests.tiny import DEVICES, tiny_llama

V = 8
# rows of equal length with different masks: first masked positions 1, 2 and 4, runs of several lengths
ROWS = torch.tensor([[1, 3, 0, 5, 0, 2, 6, 4, 7, 1], [1, 6, 2, 2, 7, 0, 3, 5, 1, 2], [1, 4, 4, 0, 6, 3, 3, 7, 2, 5]])
MASKED = [np.array(m) for m in ([1, 2, 5, 8], [2, 4, 7], [4, 5, 6])]
SEEDS = [11, 12, 13]


def run(model, rows, s):
    """The sampler on a subset of ROWS; per row (seqs, logw, ESS before resamplings, scores by masked slot)."""
    p = sample_particles(TorchDecoder(model), ROWS[rows], [MASKED[r] for r in rows], [SEEDS[r] for r in rows], s)
    K = s.k
    out = []
    for b, r in enumerate(rows):
        sl = slice(b * K, (b + 1) * K)
        n = len(MASKED[r])
        out.append((p.seqs[sl], p.logw[b], p.ess_at[b], p.top_ids[sl, :n], p.top_probs[sl, :n]))
    return out


@pytest.mark.parametrize("temperature,smc_ess", [(1.0, 0.0), (1.0, 1.0), (1.0, 0.5), (0.7, 1.0)])
def test_a_rows_draws_do_not_depend_on_the_rows_beside_it(temperature, smc_ess):
    """Batch invariance: rows {0, 1, 2} together, each alone, and {2, 0} give every row the same particles."""
    model = tiny_llama(V, seed=3, sharpness=3.0).double()
    s = McSettings(k=16, weights="smc", temperature=temperature, top_n=2, smc_ess=smc_ess)
    together = run(model, [0, 1, 2], s)
    alone = [run(model, [r], s)[0] for r in range(3)]
    other = run(model, [2, 0], s)
    for r, (got, ref) in enumerate(zip(together, alone)):
        for g in (got, other[{0: 1, 2: 0}[r]]) if r != 1 else (got,):
            assert torch.equal(g[0], ref[0])  # the same tokens drawn
            torch.testing.assert_close(g[1], ref[1], atol=1e-9, rtol=0)
            torch.testing.assert_close(g[2], ref[2], equal_nan=True)
            assert torch.equal(g[3], ref[3])
            torch.testing.assert_close(g[4], ref[4], atol=1e-6, rtol=0)
    if smc_ess == 1.0:
        # resampling happened where a visible run precedes a masked position (rows 0, 1), never in row 2
        resampled = [int((~torch.isnan(t[2])).sum()) for t in together]
        assert resampled[0] > 0 and resampled[1] > 0 and resampled[2] == 0


@torch.no_grad()
def test_every_rows_recorded_scores_follow_its_particles_across_resamplings():
    """Cache rows copied between particles (`Decoder.copy_rows`) leave each particle's recorded next-token
    scores equal to p(.|x_<i) of its own final sequence, in every row of the batch."""
    model = tiny_llama(V, seed=2, sharpness=4.0)
    s = McSettings(k=32, weights="smc", top_n=2, smc_ess=1.0)
    for r, (seqs, _, ess_at, ids, probs) in enumerate(run(model, [0, 1, 2], s)):
        lp = torch.log_softmax(model(seqs).logits.double(), -1)
        for q, i in enumerate(MASKED[r].tolist()):
            got = torch.zeros(32, V).scatter_(1, ids[:, q].long(), probs[:, q])
            assert torch.allclose(got, lp[:, i - 1].exp().float(), atol=1e-5), (r, i)
        visible = [j for j in range(ROWS.shape[1]) if j not in MASKED[r]]
        assert torch.equal(seqs[:, visible], ROWS[r, visible].repeat(32, 1))


def test_uniforms_are_a_function_of_the_row_seed_alone():
    u, u0 = row_uniforms([5, 6, 7], 4, 10)
    v, v0 = row_uniforms([7, 5], 4, 10)
    assert torch.equal(u[0], v[1]) and torch.equal(u[2], v[0]) and torch.equal(u0[2], v0[0])
    assert not torch.equal(u[0], u[1]) and u.shape == (3, 4, 10) and ((u >= 0) & (u < 1)).all()


def reference_mixture(ids, probs, w, top_n):
    """Σ_k w_k · score_k of one position by torch.unique (the plain definition)."""
    uniq, inv = torch.unique(ids.reshape(-1), return_inverse=True)
    mass = torch.zeros(len(uniq), dtype=torch.float64).index_add_(0, inv, (w[:, None] * probs.double()).reshape(-1))
    keep = mass > 0
    uniq, mass = uniq[keep], mass[keep]
    order = torch.argsort(mass, descending=True, stable=True)[:top_n]
    return uniq[order], mass[order].log()


def test_the_batched_mixture_equals_its_definition():
    g = torch.Generator().manual_seed(0)
    B, K, m = 50, 6, 5
    ids = torch.randint(0, 9, (B, K, m), generator=g)  # duplicates within and across particles
    probs = torch.rand(B, K, m, generator=g, dtype=torch.float64) * (torch.rand(B, K, m, generator=g) > 0.3)
    probs[:, :, 0] = 0.25  # ties between ids
    w = torch.softmax(torch.randn(B, K, generator=g, dtype=torch.float64), -1)
    got_ids, got_lp = mixture(ids, probs, w, top_n=7)
    for b in range(B):
        ref_ids, ref_lp = reference_mixture(ids[b], probs[b], w[b], 7)
        n = len(ref_ids)
        assert torch.equal(got_ids[b, :n], ref_ids)
        torch.testing.assert_close(got_lp[b, :n], ref_lp, atol=1e-12, rtol=0)
        assert torch.isinf(got_lp[b, n:]).all()
    ids, lp = mixture(
        torch.tensor([[[1, 2], [2, 3]]]), torch.tensor([[[0.5, 0.5], [0.25, 0.75]]]), torch.tensor([[0.5, 0.5]]), 3
    )
    assert ids.tolist() == [[2, 3, 1]] and torch.allclose(
        lp.exp(), torch.tensor([[0.375, 0.375, 0.25]], dtype=torch.float64)
    )


@pytest.mark.parametrize("score", ["next-token", "full-conditional"])
def test_targets_of_rows_together_equal_rows_alone(score):
    model = tiny_llama(V, seed=4, sharpness=3.0).double()
    s = McSettings(k=12, score=score, weights="smc", top_n=V, rescore_k=4, window=3, smc_ess=1.0)
    got = mc_targets(model, ROWS, MASKED, SEEDS, s)
    for r in range(3):
        ref = mc_targets(model, ROWS[r : r + 1], MASKED[r : r + 1], SEEDS[r : r + 1], s)[0]
        assert got[r].ess == pytest.approx(ref.ess) and got[r].ess_before == pytest.approx(ref.ess_before)
        for (ia, la), (ib, lb) in zip(zip(got[r].ids, got[r].logprobs), zip(ref.ids, ref.logprobs)):
            assert tv(dense(ia, la), dense(ib, lb)) < 1e-9


def test_rows_at_once_converge_to_the_exact_limit():
    model = tiny_llama(V, seed=5, sharpness=4.0)
    x = torch.tensor([1, 3, 0, 5, 0, 2])
    masked = [2, 4]
    limits = exact_limits(model, x, masked)
    # the same row twice, other draws: each estimate near the importance limit
    s = McSettings(k=3000, score="next-token", weights="smc", top_n=V, smc_ess=1.0)
    got = mc_targets(model, x.repeat(2, 1), [np.array(masked)] * 2, [1, 2], s)
    for est in got:
        for p, i in enumerate(masked):
            own = limits[i][("importance", "next-token")]
            assert tv(dense(est.ids[p], est.logprobs[p]), own) < 0.04


def test_the_static_cache_decoder_draws_what_the_dynamic_one_draws():
    """`StaticDecoder` (CUDA's: preallocated cache, graph-capturable step; here without the graph) against
    `TorchDecoder`, through resamplings that copy cache rows."""
    from ar2mdm.precompute.decode import StaticDecoder

    model = tiny_llama(V, seed=3, sharpness=3.0).double()
    s = McSettings(k=8, weights="smc", top_n=2, smc_ess=1.0)
    masks = [MASKED[r] for r in range(3)]
    a = sample_particles(TorchDecoder(model), ROWS, masks, SEEDS, s)
    static = StaticDecoder(model, ROWS.shape[1], graph=False)
    b = sample_particles(static, ROWS, masks, SEEDS, s)
    assert torch.equal(a.seqs, b.seqs) and (~torch.isnan(a.ess_at)).sum() > 0
    torch.testing.assert_close(a.logw, b.logw, atol=1e-9, rtol=0)
    torch.testing.assert_close(a.top_probs, b.top_probs, atol=1e-6, rtol=0)
    # one decoder serves a build's batches: the same size reuses (and zeroes) its cache, another size gets its own
    cache = static.cache
    again = sample_particles(static, ROWS, masks, SEEDS, s)
    assert static.cache is cache and torch.equal(again.seqs, a.seqs)
    torch.testing.assert_close(again.logw, a.logw, atol=1e-9, rtol=0)
    one = sample_particles(static, ROWS[:1], masks[:1], SEEDS[:1], s)
    assert static.cache is not cache and torch.equal(one.seqs, a.seqs[: s.k])


@pytest.mark.parametrize("device", DEVICES)
def test_the_compiled_decode_step_draws_what_the_eager_one_draws(device):
    """`StaticDecoder(graph=True)`: the step under torch.compile(mode="reduce-overhead"), replayed as a CUDA graph
    on CUDA (on the CPU compiled, without a graph): it traces, stays compiled (no fall-back to eager), and over
    resamplings that copy cache rows, and a second batch in the same buffers, draws what the dynamic cache draws."""
    from ar2mdm.precompute.decode import StaticDecoder

    model = tiny_llama(V, seed=3, sharpness=3.0).float().to(device)
    rows = ROWS.to(device)
    s = McSettings(k=8, weights="smc", top_n=2, smc_ess=1.0)
    masks = [MASKED[r] for r in range(3)]
    a = sample_particles(TorchDecoder(model), rows, masks, SEEDS, s)
    static = StaticDecoder(model, ROWS.shape[1], graph=True)
    for _ in range(2):
        b = sample_particles(static, rows, masks, SEEDS, s)
        assert static.graph and static._decode is not None
        assert torch.equal(a.seqs, b.seqs)
        torch.testing.assert_close(a.logw, b.logw, atol=1e-5, rtol=0)


def test_auto_batch_size_divides_free_memory_by_what_a_row_takes(monkeypatch, tmp_path):
    """--batch-size auto on CUDA (arithmetic only; no GPU needed): the KV cache dominates a 135M-shaped row."""
    from types import SimpleNamespace

    from ar2mdm.precompute.autosize import auto_batch_size
    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.mc.particles import bytes_per_row

    shape = SimpleNamespace(
        num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3, hidden_size=576, vocab_size=49152
    )
    per_row = bytes_per_row(shape, 512, 8, 64, 2)
    kv = 8 * 512 * 2 * 30 * 3 * 64 * 2
    assert kv < per_row < 2 * kv
    cfg = BuildConfig(corpus=str(tmp_path), mode="mc", seq_len=512, seqs_per_shard=4096, masks_per_seq=2)
    teacher = SimpleNamespace(
        device="cuda:0",
        model=SimpleNamespace(config=shape, parameters=lambda: iter([torch.zeros(1, dtype=torch.bfloat16)])),
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (100 * 2**30, 140 * 2**30))
    seqs, why = auto_batch_size(cfg, teacher)
    assert seqs == int(0.8 * 100 * 2**30) // (per_row * 2) and "GiB free" in why
    assert auto_batch_size(BuildConfig(corpus=str(tmp_path), mode="topk"), teacher)[0] == 8
    cpu = SimpleNamespace(device="cpu", model=teacher.model)
    assert auto_batch_size(cfg, cpu)[0] == 8


def test_a_teacher_that_overflows_stops_with_one_line():
    """float16 is the CUDA default (docs/scaling.md, Numerics): a NaN from overflowing activations must not reach
    a shard; every mode stops with a pointer to --dtype bfloat16."""
    from ar2mdm.precompute.topk import rescore
    from ar2mdm.precompute.tree import TorchScorer
    from ar2mdm.shared.errors import UserError

    model = tiny_llama(V, seed=3)
    with torch.no_grad():
        model.model.norm.weight[0] = float("nan")
    with pytest.raises(UserError, match="--dtype bfloat16"):
        mc_targets(model, ROWS, MASKED, SEEDS, McSettings(k=2, weights="importance", top_n=2))
    with pytest.raises(UserError, match="--dtype bfloat16"):
        rescore(TorchScorer(model), ROWS, [torch.as_tensor(m) for m in MASKED], k=2, window=2)


def test_auto_dtype_is_float16_on_cuda_except_for_gemma():
    from types import SimpleNamespace

    from ar2mdm.precompute.teacher import auto_dtype

    assert auto_dtype("cpu", SimpleNamespace(model_type="llama")) == "float32"
    assert auto_dtype("cuda", SimpleNamespace(model_type="llama")) == "float16"
    assert auto_dtype("cuda:1", SimpleNamespace(model_type="gemma3_text")) == "bfloat16"


def test_auto_token_budget_is_the_cuda_default_where_memory_allows(monkeypatch, tmp_path):
    from types import SimpleNamespace

    from ar2mdm.precompute.autosize import resolve_auto
    from ar2mdm.precompute.config import CUDA_TOKEN_BUDGET, DEFAULT_TOKEN_BUDGET, BuildConfig

    shape = SimpleNamespace(
        num_hidden_layers=24,
        num_attention_heads=32,
        num_key_value_heads=32,
        hidden_size=2048,
        vocab_size=49152,
        intermediate_size=8192,
    )
    model = SimpleNamespace(config=shape, parameters=lambda: iter([torch.zeros(1, dtype=torch.float16)]))
    gpu = SimpleNamespace(device="cuda", model=model, whole_shard=False)
    cfg = BuildConfig(corpus=str(tmp_path))
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (100 * 2**30, 140 * 2**30))
    got, said = resolve_auto(cfg, gpu)
    assert (
        got.token_budget == CUDA_TOKEN_BUDGET
        and got.batch_size == 8
        and said == [f"--token-budget {CUDA_TOKEN_BUDGET} (auto: 100.0 GiB free)"]
    )
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda: (1 * 2**30, 140 * 2**30))  # little free: a smaller one
    assert DEFAULT_TOKEN_BUDGET <= resolve_auto(cfg, gpu)[0].token_budget < CUDA_TOKEN_BUDGET
    cpu = SimpleNamespace(device="cpu", model=model, whole_shard=False)
    assert resolve_auto(cfg, cpu) == (
        BuildConfig(corpus=str(tmp_path), batch_size=8, token_budget=DEFAULT_TOKEN_BUDGET),
        [],
    )
    given = BuildConfig(corpus=str(tmp_path), batch_size=3, token_budget=100)
    assert resolve_auto(given, gpu) == (given, [])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("static", [False, True])
def test_the_position_loop_never_waits_for_the_device(static, device):
    """No op in the sampler (the teacher's forward included) reads a device value or has a data-dependent
    size: on CUDA each would stop the host at every position (tests/syncs.py). Checked on a sampler that draws,
    weighs and resamples."""
    from ar2mdm.precompute.decode import StaticDecoder
    from tests.syncs import HostSyncs

    model = tiny_llama(V, seed=3, sharpness=3.0).to(device)
    s = McSettings(k=8, weights="smc", top_n=2, smc_ess=1.0)
    masks = [MASKED[r] for r in range(3)]
    decoder = StaticDecoder(model, ROWS.shape[1], graph=False) if static else TorchDecoder(model)
    with HostSyncs() as syncs:
        p = sample_particles(decoder, ROWS.to(device), masks, SEEDS, s)
    assert (~torch.isnan(p.ess_at)).sum() > 0  # resamplings happened
    assert syncs.count == 0, dict(syncs.where)
