"""Trainer and evaluator maths: the non-finite guard, SFT padding targets, the A2D warm start
(AR shift, RoPE scaling, biases), --steps 0, and the ELBO estimator against exact enumeration."""

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.schemas import Manifest
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.masking import maskable_positions, sample_count_masks, stratified_counts
from ar2mdm.student.model import Student, StudentConfig, rope_inv_freq
from ar2mdm.train import loop
from ar2mdm.train.cli import app
from ar2mdm.train.config import EvalConfig
from ar2mdm.train.data import Row, TargetSpec, collate, sft_padding_start
from ar2mdm.train.evaluate import elbo_row_estimates, evaluate
from ar2mdm.train.loop import run_training
from tests.tiny import char_tokenizer
from tests.train.test_trainer import tcfg

runner = CliRunner()


def test_a_non_finite_loss_stops_the_run_with_one_line_naming_the_step(tiny_shards, tmp_path, monkeypatch):
    real = loop.step_losses
    calls = {"n": 0}

    def nan_at_step_5(*args, **kw):
        calls["n"] += 1
        loss, parts = real(*args, **kw)
        if calls["n"] == 5:
            loss = loss * float("nan")
            parts["loss"] = parts["loss"] * float("nan")
        return loss, parts

    monkeypatch.setattr(loop, "step_losses", nan_at_step_5)
    with pytest.raises(UserError, match=r"^step 5: non-finite loss nan; .*checkpoint of step 3 .* is kept"):
        run_training(tcfg(tiny_shards, tmp_path / "nan"))
    # the checkpoint of step 3 is intact and resumable
    monkeypatch.setattr(loop, "step_losses", real)
    assert run_training(tcfg(tiny_shards, tmp_path / "nan", resume=True))["steps"] == 6


def test_a_non_finite_gradient_is_refused_before_the_update(tiny_shards, tmp_path, monkeypatch):
    real = loop.step_losses

    def nan_grad(*args, **kw):
        loss, parts = real(*args, **kw)
        w = next(args[0].parameters())
        return loss + torch.sqrt((w * 0.0).sum()), parts  # value unchanged, d sqrt(0) = inf: NaN gradients

    monkeypatch.setattr(loop, "step_losses", nan_grad)
    with pytest.raises(UserError, match=r"^step 1: non-finite gradient norm nan"):
        run_training(tcfg(tiny_shards, tmp_path / "g"))


def test_sft_padding_gets_eos_targets():
    eos, L = 2, 10
    ids = np.array([1, 5, 6, 7, 8, 2, 2, 2, 2, 2], np.int32)  # BOS, prompt 5 6, response 7 8, EOS (end), 4 pads
    assert sft_padding_start(ids, 3, eos) == 6
    assert sft_padding_start(ids, 0, eos) == L  # pretrain rows have no padding
    assert sft_padding_start(np.array([1, 5, 6, 7, 8, 9, 9, 9, 9, 9], np.int32), 3, eos) == L
    masked = np.array([4, 5, 7, 9], np.int32)
    tgt_ids = np.array([[11, 12], [2, 13], [14, 15], [16, 17]], np.int32)  # what a teacher wrote there
    tgt_lp = np.log(np.array([[0.6, 0.4], [0.9, 0.1], [0.5, 0.5], [0.7, 0.3]], np.float32))
    row = Row("r", ids, 3, 0.4, masked, masked, np.arange(0, 9, 2, dtype=np.int64), tgt_ids.ravel(), tgt_lp.ravel())
    b = collate([row], TargetSpec(top_n=2, eos_id=eos, logprob_dtype="float32", exact_support=False))
    assert b.target_ids[:2].tolist() == [[11, 12], [2, 13]]  # response and its end: the teacher's targets
    assert b.target_ids[2:, 0].tolist() == [eos, eos] and torch.all(b.target_logprobs[2:, 0] == 0)
    assert torch.all(torch.isinf(b.target_logprobs[2:, 1]))


def _llama_folder(path: Path, **cfg_kw) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = char_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
        **cfg_kw,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.5)  # biases that matter
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


@pytest.mark.parametrize("kw", [{}, {"rope_scaling": LLAMA3, "attention_bias": True, "mlp_bias": True}])
def test_init_from_keeps_the_ar_shift_rope_scaling_and_biases(tiny_shards, tmp_path, kw):
    """One token per block, every position masked, the converted student is its AR teacher, shifted by one: x_i from
    the clean h_{i-1} (the block layout's clean half is causal attention at B = 1)."""
    from transformers import AutoModelForCausalLM

    from ar2mdm.train.init import student_from_ar

    folder = _llama_folder(tmp_path / "ar", **kw)
    m = Manifest.load(tiny_shards)
    tok = m.tokenizer
    student = student_from_ar(str(folder), tok.vocab_size, tok.sha256, m.seq_len, block_size=1).eval()
    assert student.config.shift
    ar = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="sdpa").eval()
    x = torch.randint(3, m.tokenizer.vocab_size, (2, 40))
    with torch.no_grad():
        ref = ar(x).logits  # (B, L, V): position i predicts x_{i+1}
        got = student(torch.full_like(x, tok.vocab_size), context=x)  # position i predicts x_i
    assert torch.allclose(got[:, 1:], ref[:, :-1], atol=1e-4)
    assert not student_from_ar(str(folder), tok.vocab_size, tok.sha256, m.seq_len, shift=False).config.shift


def test_rope_llama3_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=64, num_attention_heads=2, rope_scaling=dict(LLAMA3))
    ref, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert torch.allclose(rope_inv_freq(32, 10000.0, LLAMA3), ref.float(), rtol=1e-6)


def test_init_from_refuses_parameters_it_cannot_place(tiny_shards, tmp_path):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from ar2mdm.train.init import student_from_ar

    tok = char_tokenizer()
    cfg = Qwen3Config(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        bos_token_id=1,
        eos_token_id=2,
    )
    Qwen3ForCausalLM(cfg).save_pretrained(tmp_path / "q3")
    tok.save_pretrained(tmp_path / "q3")
    m = Manifest.load(tiny_shards)
    with pytest.raises(UserError, match="model type 'qwen3'"):
        student_from_ar(str(tmp_path / "q3"), m.tokenizer.vocab_size, m.tokenizer.sha256, m.seq_len)


def test_steps_0_saves_the_warm_start_and_eval_reports_a_standard_error(tiny_shards, tiny_teacher, tmp_path):
    corpus = tmp_path / "heldout.txt"
    corpus.write_text("\n".join(["fair is foul and foul is fair, hover through the fog and filthy air."] * 12))
    res = {}
    for shift in (True, False):
        run = tmp_path / f"a2d-{shift}"
        flag = "--ar-shift" if shift else "--no-ar-shift"
        r = runner.invoke(
            app,
            [
                "run",
                str(tiny_shards),
                "--out",
                str(run),
                "--init-from",
                str(tiny_teacher),
                "--steps",
                "0",
                flag,
                "--no-progress",
            ],
        )
        assert r.exit_code == 0, r.output
        assert json.loads((run / "checkpoint" / "config.json").read_text())["student"]["shift"] is shift
        r = runner.invoke(app, ["eval", str(run), "--data", str(corpus), "--by-line", "--mask-draws", "2"])
        assert r.exit_code == 0, r.output
        res[shift] = json.loads(r.output.strip().splitlines()[-1])
        assert res[shift]["nll_bound_se"] > 0 and math.isfinite(res[shift]["nll_bound_se"])
    # the same masks for both (they depend on the rows and seed only), so the difference is the models'
    assert res[True]["tokens"] == res[False]["tokens"]
    # --by-line is honoured: one document per line packs differently from one document per file
    whole = evaluate(EvalConfig(run=str(tmp_path / "a2d-True"), data=str(corpus), mask_draws=2))
    assert whole["nll_bound"] != res[True]["nll_bound"]


def test_stratified_counts_are_uniform_and_count_masks_exact():
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([5] * 4000 + [1] * 10 + [0] * 3)
    c = stratified_counts(n, 4, g)
    assert torch.all(c[n == 0] == 0) and torch.all(c[(n == 1)] == 1)
    five = c[n == 5]
    assert five.min() == 1 and five.max() == 5
    freq = torch.bincount(five.flatten(), minlength=6)[1:].float() / five.numel()  # pooled: uniform on 1..5
    assert torch.all((freq - 0.2).abs() < 0.02), freq
    for j in range(4):  # draw j stays in its stratum [1 + 5j/4, 1 + 5(j+1)/4)
        assert five[:, j].min() >= 1 + (5 * j) // 4 and five[:, j].max() <= 1 + (5 * (j + 1) - 1) // 4
    maskable = maskable_positions(8, torch.tensor([0, 3, 6]))
    m = sample_count_masks(maskable, torch.tensor([3, 2, 2]), g)
    assert m.sum(1).tolist() == [3, 2, 2] and not torch.any(m & ~maskable)


def test_elbo_estimator_is_unbiased_against_exact_enumeration():
    """The MDLM bound E_t[(1/t) Σ_masked -log p] computed exactly (all 2^n masks, Beta weights) vs the
    estimator kdtrain eval uses, averaged over many draws."""
    torch.manual_seed(0)
    V, L = 7, 6
    student = Student(
        StudentConfig(vocab_size=V, hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=2, intermediate_size=32)
    ).eval()
    with torch.no_grad():
        for p in student.parameters():
            p.mul_(20)  # far from uniform predictions, so a biased estimator shows
    ids = torch.tensor([[0, 3, 1, 4, 1, 5]])
    maskable = maskable_positions(L, torch.tensor([0]))
    n = int(maskable.sum())
    exact = 0.0
    with torch.no_grad():
        for bits in itertools.product([0, 1], repeat=n):
            k = sum(bits)
            if k == 0:
                continue
            mask = torch.zeros(1, L, dtype=torch.bool)
            mask[0, 1:] = torch.tensor(bits, dtype=torch.bool)
            logits = student(torch.where(mask, torch.full_like(ids, V), ids), mask)
            nll = float(torch.nn.functional.cross_entropy(logits, ids[mask], reduction="sum"))
            exact += math.gamma(k) * math.gamma(n - k + 1) / math.gamma(n + 1) * nll  # ∫ t^(k-1) (1-t)^(n-k) dt
    g = torch.Generator().manual_seed(1)
    reps = 400
    ests = torch.cat(
        [
            elbo_row_estimates(student, ids.repeat(50, 1), maskable.repeat(50, 1), 4, g, mask_id=V)[0]
            for _ in range(reps // 50)
        ]
    )
    se = float(ests.std() / math.sqrt(len(ests)))
    assert abs(float(ests.mean()) - exact) < 4 * se + 1e-6, (float(ests.mean()), exact, se)
