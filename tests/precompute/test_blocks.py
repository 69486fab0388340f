"""Targets for block students (--block-size B): a masked position of block b is conditioned on the clean blocks
before b and on block b alone. Each mode against brute force on a tiny random teacher, the shared prefix against
none, and the build end to end."""

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.cli import app
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.decode import TorchDecoder
from ar2mdm.precompute.mc.estimators import _row_targets, by_block, mc_targets
from ar2mdm.precompute.mc.particles import McSettings
from ar2mdm.precompute.topk import rescore
from ar2mdm.precompute.tree import TorchScorer
from ar2mdm.schemas import Manifest
from ar2mdm.shared.shards import read_shard
from tests.precompute.reference import rescore_naive
from tests.precompute.test_mc import exact_limits, tv
from tests.tiny import tiny_llama

V = 8


def dense(ids, logprobs, vocab=V):
    """A sparse target as a (vocab,) distribution: repeated ids (topk's true-token slot) add up."""
    return torch.zeros(vocab, dtype=torch.float64).index_add(0, ids.long(), logprobs.double().exp())


@torch.no_grad()
def test_topk_blocks_equal_the_exact_in_block_posterior():
    """k = V: every token a candidate; the target at i is p(x_i = v | x_<i, x_{i+1..end of i's block}) by enumeration
    of v over the row cut at the block's end, and not the whole row's posterior."""
    model = tiny_llama(V, seed=1, sharpness=4.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, V, (2, 12), generator=g)
    positions = [torch.tensor([1, 3, 4, 6, 11]), torch.tensor([5, 8, 10])]
    res = rescore(TorchScorer(model, 64), x, positions, k=V, window=None, block_size=4)
    naive = rescore_naive(model, x, positions, V, None, block_size=4)
    far = 0.0
    for b in range(2):
        for p, i in enumerate(positions[b].tolist()):
            end = (i // 4 + 1) * 4
            ys = x[b, :end].repeat(V, 1)
            ys[:, i] = torch.arange(V)
            lp = torch.log_softmax(model(ys).logits.double(), -1)
            joint = lp[:, i - 1 : end - 1].gather(2, ys[:, i:end, None])[..., 0].sum(1)  # (V,) log p(v, right | left)
            exact = torch.softmax(joint, 0)
            got = dense(res[b][0][p], res[b][1][p])
            assert tv(got, exact) < 1e-5, (b, i)
            assert tv(got, dense(naive[b][0][p], naive[b][1][p])) < 1e-5
            ys = x[b].repeat(V, 1)
            ys[:, i] = torch.arange(V)
            lp = torch.log_softmax(model(ys).logits.double(), -1)
            whole = torch.softmax(lp[:, i - 1 :].gather(2, ys[:, i:, None])[..., 0].sum(1), 0)
            far = max(far, tv(got, whole))
    assert far > 0.1  # the right context past the block changes the target: the blocks' cut is real


@torch.no_grad()
def test_topk_window_zero_is_the_next_token_distribution():
    """--window 0: the teacher's next-token distribution over the candidates, the left context alone (exactly the
    in-block target at a block's last position)."""
    model = tiny_llama(V, seed=2, sharpness=4.0)
    x = torch.randint(0, V, (1, 9), generator=torch.Generator().manual_seed(1))
    pos = torch.tensor([2, 5, 8])
    res = rescore(TorchScorer(model), x, [pos], k=V, window=0)
    at_end = rescore(TorchScorer(model), x, [pos], k=V, window=None, block_size=3)  # 2, 5, 8 end their blocks
    nxt = torch.softmax(model(x).logits[0].double(), -1)
    for p, i in enumerate(pos.tolist()):
        assert tv(dense(res[0][0][p], res[0][1][p]), nxt[i - 1]) < 1e-5
        assert tv(dense(at_end[0][0][p], at_end[0][1][p]), nxt[i - 1]) < 1e-5


def block_limit(model, x, masked, block_size, key=("importance", "next-token")):
    """Per masked position, the exact limit of the estimator on its block's problem: the row cut at the block's end,
    only that block's positions masked (the earlier blocks clean)."""
    out = {}
    for lo in range(0, len(x), block_size):
        inside = [i for i in masked if lo <= i < lo + block_size]
        if inside:
            lim = exact_limits(model, x[: lo + block_size], inside)
            out.update({i: lim[i][key] for i in inside})
    return out


@pytest.mark.parametrize("score", ["next-token", "full-conditional"])
def test_mc_blocks_converge_to_the_in_block_posterior(score):
    model = tiny_llama(V, seed=5, sharpness=8.0)
    x = torch.tensor([1, 3, 0, 5, 0, 2, 7, 4, 6, 1, 2, 3])
    masked = [2, 3, 5, 7, 9]  # two in block 0, two in block 1, one in block 2; blocks of 4
    s = McSettings(k=3000, weights="smc", score=score, top_n=V, rescore_k=V)
    got = mc_targets(model, x[None], [np.asarray(masked)], [7], s, block_size=4)[0]
    want = block_limit(model, x, masked, 4, ("importance", score))
    whole = exact_limits(model, x, masked)
    worst = far = 0.0
    for p, i in enumerate(masked):
        q = dense(got.ids[p], got.logprobs[p])
        worst = max(worst, tv(q, want[i]))
        far = max(far, tv(want[i], whole[i][("importance", score)]))
    assert worst < 0.04, worst
    assert far > 0.1  # the whole row's posterior is another target
    assert got.particles == 3000 and np.isfinite(got.ess)


@torch.no_grad()
def test_the_shared_clean_prefix_draws_what_prefilling_each_block_draws():
    """mc on blocks reads every block's prefix from one forward of the clean rows; prefilling each block's prefix
    itself is the reference: the same particles, so the same targets."""
    model = tiny_llama(V, seed=6, sharpness=4.0)
    g = torch.Generator().manual_seed(2)
    xs = torch.randint(0, V, (3, 12), generator=g)
    masks = [np.array([1, 2, 6, 11]), np.array([4, 5, 9]), np.array([10])]
    s = McSettings(k=5, weights="smc", top_n=4)
    shared = mc_targets(model, xs, masks, [1, 2, 3], s, block_size=4)
    dec = TorchDecoder(model)

    def run(rows, sub, sub_masks, sub_seeds):
        return _row_targets(model, dec, sub, sub_masks, sub_seeds, s=s)

    own = by_block(run, xs, [np.asarray(m, np.int64) for m in masks], [1, 2, 3], 4)
    for a, b in zip(shared, own):
        assert len(a.ids) == len(b.ids)
        for i, j, lp, lq in zip(a.ids, b.ids, a.logprobs, b.logprobs):
            assert torch.equal(i, j) and torch.allclose(lp, lq, atol=1e-5)


def test_fim_blocks_end_the_suffix_at_the_block(tmp_path):
    from tests.tiny import save_tiny_teacher

    teacher = save_tiny_teacher(tmp_path / "t", seed=4, fim=True)
    from ar2mdm.precompute.fim import fim_prompt, fim_targets, fim_token_ids
    from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer

    t = TorchTeacher.load(teacher, "cpu", "float32")
    fim = fim_token_ids(load_tokenizer(teacher))
    rows = torch.randint(3, 30, (1, 12), generator=torch.Generator().manual_seed(0))
    rows[0, 0] = 1
    pos = torch.tensor([1, 5, 7, 11])
    res = fim_targets(t, rows, [pos], fim, window=None, block_size=4, top_n=5, token_budget=64)
    for p, i in enumerate(pos.tolist()):
        prompt = fim_prompt(rows[0].tolist(), i, fim, (i // 4 + 1) * 4 - 1 - i)
        assert prompt[-2:] != [fim[2]] or i % 4 == 3  # a suffix unless i ends its block
        with torch.no_grad():
            lp = torch.log_softmax(t.model(torch.tensor([prompt])).logits[0, -1].float(), -1)
        assert torch.equal(res[0][0][p], lp.topk(5).indices)


def _cfg(corpus, teacher, out, **kw):
    base = dict(corpus=str(corpus), teacher=str(teacher), out=str(out), seq_len=16, max_sequences=4, progress=False)
    return BuildConfig(**{**base, "seqs_per_shard": 2, **kw})


@pytest.mark.parametrize("mode", ["topk", "mc"])
def test_a_block_build_records_its_blocks_and_resumes(tiny_corpus, tiny_teacher, tmp_path, mode):
    out = tmp_path / mode
    cfg = _cfg(tiny_corpus, tiny_teacher, out, mode=mode, k=3, block_size=4)
    run_build(cfg)
    m = Manifest.load(out)
    assert m.block_size == 4 and m.params["block_size"] == 4
    data = read_shard(out / m.shards[0].file)
    assert data.block_t.shape == (data.rows, 4)
    assert np.allclose(data.t, data.block_t.mean(1), atol=1e-6)
    assert (data.target_positions == data.mask_positions).all()
    again = run_build(cfg)
    assert again.shards_skipped == len(m.shards) and again.shards_written == 0
    r = CliRunner().invoke(app, ["inspect", str(out), "--json"])
    assert r.exit_code == 0 and json.loads(r.output)["block_size"] == 4


def test_one_block_per_row_is_the_whole_row_build(tiny_corpus, tiny_teacher, tmp_path):
    """--block-size L is no block at all: the same shards, byte for byte, and a manifest without a block size."""
    run_build(_cfg(tiny_corpus, tiny_teacher, tmp_path / "a", mode="topk", k=3, window="all"))
    run_build(_cfg(tiny_corpus, tiny_teacher, tmp_path / "b", mode="topk", k=3, window="all", block_size=16))
    ma, mb = Manifest.load(tmp_path / "a"), Manifest.load(tmp_path / "b")
    assert mb.block_size is None and ma.params == mb.params
    for sa, sb in zip(ma.shards, mb.shards):
        assert (tmp_path / "a" / sa.file).read_bytes() == (tmp_path / "b" / sb.file).read_bytes()


@pytest.mark.parametrize(
    "mode,window,right",
    [("topk", "auto", 0), ("fim", "auto", None), ("mc", "auto", None), ("topk", "all", None), ("topk", 3, 3)],
)
def test_window_is_decoded_in_one_place(tiny_corpus, tiny_teacher, tmp_path, mode, window, right):
    """auto: topk's targets are left-only (the teacher's next-token distribution), fim keeps a suffix and mc's
    full-conditional scores the rest of the row; the manifest records the decoded window (null: all)."""
    cfg = _cfg(tiny_corpus, tiny_teacher, tmp_path, mode=mode, window=window)
    cfg.check()
    assert cfg.right_window == right and cfg.mode_params()["window"] == right


def test_the_default_topk_build_is_the_next_token_distribution(tiny_corpus, tiny_teacher, tmp_path):
    """With no --window, topk's stored targets are the teacher's next-token distribution given the clean left
    context, renormalised over the candidates (its top K and the true token)."""
    run_build(_cfg(tiny_corpus, tiny_teacher, tmp_path, mode="topk", k=3, block_size=4))
    m = Manifest.load(tmp_path)
    data = read_shard(tmp_path / m.shards[0].file)
    model = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    checked = 0
    for r in range(data.rows):
        x = torch.as_tensor(data.input_ids[r], dtype=torch.long)[None]
        with torch.no_grad():
            nxt = torch.log_softmax(model(x).logits[0].double(), -1)
        for i, ids, lps in zip(*data.row_targets(r)):
            cand = torch.cat([nxt[i - 1].topk(3).indices, x[0, i : i + 1]]).unique()
            want = dict(zip(cand.tolist(), torch.softmax(nxt[i - 1][cand], -1).tolist()))
            got = dict(zip(ids.tolist(), np.exp(lps.astype(np.float64)).tolist()))
            assert set(got) == set(want)
            assert all(abs(got[c] - want[c]) < 2e-3 for c in want)
            checked += 1
    assert checked > 0


@pytest.mark.parametrize(
    "args,expect",
    [
        (["--block-size", "5"], "does not divide the row length 16"),
        (["--block-size", "0"], "--block-size"),
        (["--mode", "fim", "--window", "0"], "no suffix"),
        (["--window", "most"], "--window must be a whole number or auto | all, got 'most'"),
    ],
)
def test_bad_block_settings_are_one_line_and_write_nothing(tiny_corpus, tiny_teacher, tmp_path, args, expect):
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["build", str(tiny_corpus), "--teacher", str(tiny_teacher), "--out", str(out), "--seq-len", "16", *args]
    )
    assert r.exit_code == 2 and expect in r.output and "Traceback" not in r.output
    assert len([ln for ln in r.output.splitlines() if ln.strip()]) == 1
    assert not out.exists()
