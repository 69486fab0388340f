"""The block student: its attention layout, both limits of its bound (B = 1: the AR model; B = L: the
full-attention student), its cached sampler against the uncached one, and training on block shards."""

import math
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.student.block_sampler import block_generate, reveal_mask
from ar2mdm.student.model import Student, StudentConfig, block_attention_mask
from ar2mdm.train.cli import app
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.evaluate import elbo_row_estimates
from ar2mdm.train.loop import run_training

V = 30


def students(block_size: int, shift: bool):
    """A full-attention student and a block student with the same weights (float64)."""
    torch.manual_seed(0)
    c = StudentConfig(
        vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64, shift=shift
    )
    full = Student(c).double().eval()
    blk = Student(replace(c, block_size=block_size)).double().eval()
    blk.load_state_dict(full.state_dict())
    return full, blk


def test_the_mask_is_bd3lms_layout():
    L, B = 8, 2
    m = block_attention_mask(L, B)
    for q in range(2 * L):
        for k in range(2 * L):
            bq, bk = (q % L) // B, (k % L) // B
            if q < L:  # a noisy query: its own noisy block, and the clean blocks before it
                want = bk == bq if k < L else bk < bq
            else:  # a clean query: the clean blocks up to its own, never a noisy key
                want = k >= L and bk <= bq
            assert bool(m[q, k]) == want, (q, k)


@pytest.mark.parametrize("shift", [False, True])
@torch.no_grad()
def test_one_block_per_row_is_the_full_attention_student(shift):
    full, blk = students(12, shift)
    x = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(1))
    x_t = torch.where(torch.rand(3, 12, generator=torch.Generator().manual_seed(2)) < 0.5, V, x)
    assert torch.allclose(blk(x_t, context=x), full(x_t), atol=1e-12)


@pytest.mark.parametrize("shift", [False, True])
@torch.no_grad()
def test_a_block_sees_the_clean_blocks_before_it_and_nothing_after(shift):
    """Block b's logits do not move when later blocks or the noisy copy of earlier blocks change, and do move when
    the clean earlier blocks do."""
    _, blk = students(4, shift)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, V, (1, 12), generator=g)
    x_t = x.clone()
    x_t[0, 5:7] = V
    ref = blk(x_t, context=x)[0, 4:8]
    later = x.clone()
    later[0, 9:] = (later[0, 9:] + 1) % V
    noisy_earlier = x_t.clone()
    noisy_earlier[0, 1:4] = V
    assert torch.allclose(blk(torch.where(torch.arange(12) >= 8, V, x_t), context=later)[0, 4:8], ref, atol=1e-12)
    assert torch.allclose(blk(noisy_earlier, context=x)[0, 4:8], ref, atol=1e-12)
    earlier = x.clone()
    earlier[0, 2] = (earlier[0, 2] + 1) % V
    assert not torch.allclose(blk(x_t, context=earlier)[0, 4:8], ref, atol=1e-6)


@torch.no_grad()
def test_the_bound_at_one_token_per_block_is_the_ar_nll(tiny_teacher):
    """An AR model adapted with the shift at B = 1: its block bound is exactly the teacher's NLL of each token
    given the clean ones before it."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ar2mdm.shared.tokenizer import tokenizer_hash
    from ar2mdm.train.init import student_from_ar

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    ar = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    n = ar.config.vocab_size
    s = student_from_ar(str(tiny_teacher), n, tokenizer_hash(tok), 16, shift=True, block_size=1).eval()
    x = torch.randint(3, n, (2, 16), generator=torch.Generator().manual_seed(4))
    x[:, 0] = 1
    lp = torch.log_softmax(ar(x).logits.double(), -1)
    nll = -lp[:, :-1].gather(2, x[:, 1:, None])[..., 0].sum(1)  # (2,) every token but BOS
    maskable = torch.arange(16)[None].expand(2, -1) > 0
    est, _, _ = elbo_row_estimates(s, x, maskable, 3, torch.Generator().manual_seed(0), mask_id=n)
    assert torch.allclose(est, nll, rtol=1e-5)


@torch.no_grad()
def test_the_bound_at_one_block_per_row_is_the_full_attention_bound():
    full, blk = students(12, True)
    x = torch.randint(0, V, (3, 12), generator=torch.Generator().manual_seed(5))
    maskable = torch.arange(12)[None].expand(3, -1) > 0
    a = elbo_row_estimates(full, x, maskable, 4, torch.Generator().manual_seed(1), mask_id=V)
    b = elbo_row_estimates(blk, x, maskable, 4, torch.Generator().manual_seed(1), mask_id=V)
    assert torch.allclose(a[0], b[0], atol=1e-9) and a[1:] == b[1:]


def test_reveal_mask_takes_the_confident_and_at_least_one():
    conf = torch.tensor([[0.2, 0.95, 0.91, 0.5], [0.3, 0.1, 0.2, 0.4]])
    masked = torch.tensor([[True, True, True, True], [True, True, False, False]])
    assert reveal_mask(conf, masked, 0.9, None).tolist() == [[False, True, True, False], [True, False, False, False]]
    assert reveal_mask(conf, masked, 1.0, None).sum(1).tolist() == [1, 1]
    assert reveal_mask(conf, masked, 0.9, 3).tolist() == [[False, True, True, True], [True, True, False, False]]


@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("threshold,per_forward", [(1.0, None), (0.05, None), (0.9, 3)])
@torch.no_grad()
def test_the_cached_sampler_draws_what_the_uncached_one_draws(shift, threshold, per_forward):
    """The KV cache of committed blocks against the whole row in the training layout at every forward: the same
    tokens and forwards; a row alone draws what it draws in a batch."""
    _, blk = students(4, shift)
    prompt = torch.randint(0, V, (3, 6), generator=torch.Generator().manual_seed(6))
    kw = dict(threshold=threshold, per_forward=per_forward, seeds=[1, 2, 3], temperature=1.0)
    x1, f1 = block_generate(blk, prompt, 13, use_cache=True, **kw)
    x2, f2 = block_generate(blk, prompt, 13, use_cache=False, **kw)
    assert torch.equal(x1, x2) and torch.equal(f1, f2)
    assert not (x1 == V).any()
    alone, fa = block_generate(blk, prompt[1:2], 13, **{**kw, "seeds": [2]})
    assert torch.equal(alone, x1[1:2]) and fa.tolist() == f1[1:2].tolist()
    if threshold == 1.0:
        assert f1.tolist() == [14] * 3  # one token a forward: the block [4, 8) holds 2 masks, then 3 blocks of 4
    if per_forward == 3:
        assert f1.tolist() == [1 + 2 + 2 + 2] * 3  # ceil(2/3) + 3 · ceil(4/3)


@torch.no_grad()
def test_a_row_stops_after_the_block_that_holds_its_stop_token():
    _, blk = students(4, False)
    blk.model.norm.weight.zero_()  # every logit 0: one token a forward
    prompt = torch.tensor([[1, 5, 6, 7]])
    x, f = block_generate(blk, prompt, 16, seeds=[0], stop_ids=tuple(range(V)))  # every token stops
    assert f.tolist() == [4]  # the first block only, one token a forward
    assert (x[0, 8:] == V).all()


def test_a_block_student_trains_evaluates_samples_and_resumes(block_shards, tmp_path):
    run = tmp_path / "run"
    res = run_training(
        TrainConfig(shards=str(block_shards), out=str(run), student="tiny", steps=4, batch_size=4, progress=False)
    )
    assert math.isfinite(res["loss"])
    runner = CliRunner()
    r = runner.invoke(app, ["eval", str(run), "--data", str(block_shards), "--max-rows", "4"])
    assert r.exit_code == 0 and "kd_loss" in r.output, r.output
    out = tmp_path / "s.jsonl"
    r = runner.invoke(app, ["sample", str(run), "--prompt", "when", "--num", "2", "--length", "8", "--out", str(out)])
    assert r.exit_code == 0 and "tokens per forward" in r.output, r.output
    for flags in (["--steps", "4"], ["--remasking", "low-confidence", "--span-length", "2"]):  # the other kind's
        r = runner.invoke(app, ["sample", str(run), "--prompt", "when", *flags])
        assert r.exit_code == 2 and "full-attention students' sampler" in r.output and "Traceback" not in r.output
    r = runner.invoke(app, ["fill", str(run), "--text", "when shall we three [MASK] again in [MASK]"])
    assert r.exit_code == 0 and "[MASK] 1: " in r.output and "[MASK] 2: " in r.output, r.output
    from ar2mdm.schemas.samples import read_samples

    recs = read_samples(out)
    assert all(r.forwards and r.forwards >= 1 for r in recs) and recs[0].source.settings["threshold"] == 0.9
    res = run_training(
        TrainConfig(
            shards=str(block_shards), out=str(run), student="tiny", steps=6, batch_size=4, progress=False, resume=True
        )
    )
    assert res["steps"] == 6


def test_a_student_of_another_block_size_is_refused_in_one_line(block_shards, tiny_shards, tmp_path):
    from ar2mdm.shared.errors import UserError

    run = tmp_path / "full"
    run_training(TrainConfig(shards=str(tiny_shards), out=str(run), student="tiny", steps=1, progress=False))
    with pytest.raises(UserError, match=r"full-attention student and the shards hold targets for a block-8"):
        run_training(TrainConfig(shards=str(block_shards), out=str(run), student="tiny", steps=2, resume=True))
    with pytest.raises(UserError, match="another block size"):
        run_training(TrainConfig(shards=str(tiny_shards), out=str(tmp_path / "m"), mix=[f"{block_shards}:0.5"]))
    r = CliRunner().invoke(app, ["eval", str(run), "--data", str(block_shards)])
    assert r.exit_code == 2 and "block-8" in r.output and len(r.output.strip().splitlines()) == 1


def test_figures_by_masking_level_add_up_to_the_whole(block_shards, tmp_path):
    """--by-level: every masked position of the bound's draws and of the shards' own masks lands in one bin; the
    bins' mean nll, weighted by their positions, is the mean over all masked positions."""
    from ar2mdm.train.config import EvalConfig
    from ar2mdm.train.evaluate import evaluate

    run = tmp_path / "run"
    run_training(TrainConfig(shards=str(block_shards), out=str(run), student="tiny", steps=1, progress=False))
    res = evaluate(EvalConfig(run=str(run), data=str(block_shards), max_rows=6, mask_draws=2, by_level=4))
    bound, targets = res["by_level"]["bound"], res["by_level"]["targets"]
    assert len(bound) == 4 and bound[0]["level"] == "0.00-0.25"
    masked = sum(b["positions"] for b in bound)
    assert masked > 0 and res["masked_token_accuracy"] == pytest.approx(
        sum(b["accuracy"] * b["positions"] for b in bound if b["positions"]) / masked
    )
    from ar2mdm.train.data import rows_of_shard

    rows = []
    for f in sorted(block_shards.glob("part-*.parquet")):
        rows += list(rows_of_shard(f))
    assert sum(t["positions"] for t in targets) == sum(len(r.mask_positions) for r in rows[:6])
    assert all(t["kl"] is None or t["kl"] >= -1e-6 for t in targets)
