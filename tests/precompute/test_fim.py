import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.cli import app
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.fim import fim_prompt, fim_targets, fim_token_ids
from ar2mdm.precompute.teacher import TorchTeacher
from ar2mdm.shared.shards import read_shard
from ar2mdm.shared.validate import validate_dir
from tests.tiny import FIM_TOKENS, save_tiny_teacher


@pytest.fixture(scope="module")
def fim_teacher(tmp_path_factory):
    return save_tiny_teacher(tmp_path_factory.mktemp("fim_teacher"), seed=4, fim=True)


def test_prompt_is_prefix_suffix_middle_without_bos():
    fim = (100, 101, 102)
    x = [1, 10, 11, 12, 13, 14]
    assert fim_prompt(x, 3, fim, 2) == [100, 10, 11, 101, 13, 14, 102]
    assert fim_prompt(x, 1, fim, 2) == [100, 101, 11, 12, 102]
    assert fim_prompt(x, 5, fim, 3) == [100, 10, 11, 12, 13, 101, 102]


@torch.no_grad()
def test_fim_targets_equal_a_direct_teacher_call(fim_teacher):
    tok = AutoTokenizer.from_pretrained(fim_teacher)
    model = AutoModelForCausalLM.from_pretrained(fim_teacher).eval()
    fim = fim_token_ids(tok)
    assert fim == tuple(tok.convert_tokens_to_ids(FIM_TOKENS))
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, 30, (2, 10), generator=g)
    rows[:, 0] = 1
    positions = [torch.tensor([1, 4, 9]), torch.tensor([2, 3])]
    teacher = TorchTeacher(model=model, device="cpu", dtype="float32")
    res = fim_targets(teacher, rows, positions, fim, window=3, block_size=None, top_n=5, token_budget=20)  # padded
    for b, pos in enumerate(positions):
        for p, i in enumerate(pos.tolist()):
            prompt = torch.tensor([fim_prompt(rows[b].tolist(), i, fim, min(9 - i, 3))])
            lp = torch.log_softmax(model(prompt).logits[0, -1].float(), -1)
            v, ids = lp.topk(5)
            assert torch.equal(res[b][0][p], ids)
            assert torch.allclose(res[b][1][p], v, atol=1e-5)


def test_fim_build_end_to_end(fim_teacher, tiny_corpus, tmp_path):
    out = tmp_path / "fim"
    run_build(
        BuildConfig(
            corpus=str(tiny_corpus),
            teacher=str(fim_teacher),
            out=str(out),
            mode="fim",
            seq_len=24,
            top_n=6,
            seqs_per_shard=2,
            max_sequences=3,
            progress=False,
        )
    )
    m = validate_dir(out)
    data = read_shard(out / m.shards[0].file)
    counts = np.diff(data.entry_offsets)
    assert (counts == 6).all()
    sums = np.add.reduceat(np.exp(data.target_logprobs.astype(np.float64)), data.entry_offsets[:-1])
    assert (sums <= 1 + 1e-3).all() and (sums > 0.3).all()


def test_teacher_without_fim_tokens_is_refused(tiny_teacher, tiny_corpus, tmp_path):
    r = CliRunner().invoke(
        app,
        [
            "build",
            str(tiny_corpus),
            "--teacher",
            str(tiny_teacher),
            "--out",
            str(tmp_path / "o"),
            "--mode",
            "fim",
            "--no-progress",
        ],
    )
    assert r.exit_code == 2 and "<|fim_prefix|>" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "o").exists()
