"""`kdtrain sample`: the batched sampler against one row at a time, seeded files, prompts, one-line errors."""

import json

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.schemas.samples import read_samples
from ar2mdm.shared.sampling import corpus_prompts, sample_seed
from ar2mdm.student.denoise import denoise
from ar2mdm.student.model import Student, StudentConfig
from ar2mdm.train.checkpoint import run_tokenizer
from ar2mdm.train.cli import app
from ar2mdm.train.config import SampleConfig, TrainConfig
from ar2mdm.train.loop import run_training
from ar2mdm.train.sample import sample
from tests.tiny import TEXT

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny_run(tiny_shards, tmp_path_factory):
    run = tmp_path_factory.mktemp("sample") / "run"
    run_training(TrainConfig(shards=str(tiny_shards), out=str(run), student="tiny", steps=3, progress=False))
    return run


@pytest.mark.parametrize("remasking", ["low-confidence", "random"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
@pytest.mark.parametrize("span_length", [None, 3])
def test_a_batch_draws_what_each_row_draws_alone(remasking, temperature, span_length):
    """Rows share nothing but the forward: each draws from its own seed, so a row's sample is the same in a
    batch of four as alone (float64, so that batched and single matmuls round alike)."""
    torch.manual_seed(0)
    model = Student(StudentConfig(vocab_size=40, hidden_size=32, num_heads=2, num_kv_heads=1)).double().eval()
    prompts = torch.randint(0, 40, (4, 3))
    x = torch.cat([prompts, torch.full((4, 9), 40)], 1)  # (4, 12): 9 masks after a prompt of 3
    seeds = [11, 12, 13, 14]
    kw = dict(temperature=temperature, remasking=remasking, span_length=span_length)
    batched = denoise(model, x, 5, seeds=seeds, **kw)
    alone = torch.cat([denoise(model, x[b : b + 1], 5, seeds=[seeds[b]], **kw) for b in range(4)])
    assert torch.equal(batched, alone)
    assert torch.equal(batched[:, :3], prompts) and (batched != 40).all()  # prompt kept, every mask filled
    if temperature > 0:  # the seeds matter
        assert not torch.equal(denoise(model, x, 5, seeds=[1, 2, 3, 4], **kw), batched)


def test_every_step_reveals_its_share_of_the_masks():
    """8 masks in 3 steps: after step s, int(8 (1 - (s+1)/3)) stay masked (the linear schedule): 3, 3, 2 revealed."""
    seen = []

    class Counting(Student):
        def forward(self, x, select=None, context=None):
            seen.append(int((x == self.config.mask_id).sum(1)[0]))
            return super().forward(x, select, context)

    model = Counting(StudentConfig(vocab_size=20, hidden_size=16, num_heads=2, num_kv_heads=1)).eval()
    x = torch.cat([torch.tensor([[1, 2]] * 2), torch.full((2, 8), 20)], 1)
    denoise(model, x, 3)
    assert seen == [8, 5, 2]


def test_rows_with_masks_elsewhere_are_refused():
    model = Student(StudentConfig(vocab_size=20, hidden_size=16, num_heads=2, num_kv_heads=1)).eval()
    x = torch.tensor([[1, 20, 20], [1, 2, 20]])
    with pytest.raises(ValueError, match="same positions"):
        denoise(model, x, 2)


def test_the_same_command_writes_the_same_file_whatever_the_batch_size(tiny_run, tmp_path):
    a, b, c = (tmp_path / f"{n}.jsonl" for n in "abc")
    base = ["sample", str(tiny_run), "--num", "5", "--length", "6", "--steps", "3", "--temperature", "1"]
    for out, bs in ((a, "2"), (b, "2"), (c, "5")):
        r = runner.invoke(app, base + ["--batch-size", bs, "--out", str(out)])
        assert r.exit_code == 0, r.output
    assert a.read_bytes() == b.read_bytes()
    ra, rc = read_samples(a), read_samples(c)
    assert [r.ids for r in ra] == [r.ids for r in rc] and len(ra) == 5
    assert len({tuple(r.ids) for r in ra}) > 1  # each sample its own draws
    src = ra[0].source
    assert src.kind == "student" and src.step == 3 and src.settings["steps"] == 3 and src.settings["num"] == 5
    line = json.loads(a.read_text().splitlines()[0])
    assert line["format"] == "ar2mdm.samples" and line["version"] == 1


def test_prompts_from_held_out_rows_and_what_ends_a_sample(tiny_run, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "h.txt").write_text(TEXT * 3)
    tok = run_tokenizer(tiny_run)
    prompts = corpus_prompts(str(held), tok, prompt_tokens=4, length=7, num=3, split="test")
    from ar2mdm.shared.corpus import CorpusStats, iter_documents, list_corpus_files
    from ar2mdm.shared.tokenizer import pack_documents

    rows = list(pack_documents(iter_documents(list_corpus_files(held), CorpusStats()), tok, 12))[:3]
    assert [p.ids + p.reference for p in prompts] == [r.tolist() for r in rows]  # prompt + reference = the row
    cfg = SampleConfig(run=str(tiny_run), num=3, prompts_from=str(held), prompt_tokens=4, length=7, steps=7)
    recs, _ = sample(cfg)
    eos = tok.eos_token_id
    for r, p in zip(recs, prompts):
        assert r.prompt_ids == p.ids and r.prompt == tok.decode(p.ids[1:]) and eos not in r.ids
        assert len(r.ids) == 7 or r.stopped  # a sample ends at its first EOS, and says so
    with pytest.raises(Exception, match="rows of 12 tokens, --num asks for 500"):
        sample(SampleConfig(run=str(tiny_run), num=500, prompts_from=str(held), prompt_tokens=4, length=7))


def test_sample_seeds_depend_on_seed_and_index_only():
    assert sample_seed(0, 1) == sample_seed(0, 1) != sample_seed(0, 2) != sample_seed(1, 1)
    assert len({sample_seed(s, i) for s in range(20) for i in range(50)}) == 1000


@pytest.mark.parametrize(
    "args,msg",
    [
        (["--prompt", "a", "--prompts", "p.txt"], "give one source of prompts"),
        (["--prompts", "nope.txt"], "--prompts nope.txt does not exist"),
        (["--prompts-from", "nowhere"], "--prompts-from nowhere does not exist"),
        (["--prompt-tokens", "-1"], "--prompt-tokens must be at least 0"),
        (["--length", "500"], "exceeds the student's"),
        (["--threshold", "0.5"], "--threshold: a setting of block students' sampler;"),
        (["--per-forward", "2", "--threshold", "0.3"], "--threshold, --per-forward: a setting of block students'"),
    ],
)
def test_bad_sampling_input_is_one_line(tiny_run, tmp_path, monkeypatch, args, msg):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "p.txt").write_text("a\n")
    r = runner.invoke(app, ["sample", str(tiny_run), *args])
    assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output


def test_prompt_files_cycle_and_a_folder_is_no_out_file(tiny_run, tmp_path):
    p = tmp_path / "p.jsonl"
    p.write_text('{"prompt": "fair is"}\n{"prompt": "when the"}\n')
    out = tmp_path / "s.jsonl"
    r = runner.invoke(
        app, ["sample", str(tiny_run), "--prompts", str(p), "--num", "3", "--length", "8", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert [s.prompt for s in read_samples(out)] == ["fair is", "when the", "fair is"]
    r = runner.invoke(app, ["sample", str(tiny_run), "--out", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output
    p.write_text('{"text": "x"}\n')
    r = runner.invoke(app, ["sample", str(tiny_run), "--prompts", str(p)])
    assert r.exit_code == 2 and "no 'prompt' text field" in r.output
