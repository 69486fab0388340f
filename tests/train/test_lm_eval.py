"""`kdtrain lm-eval`: the harness's scores of a student on local tasks, checked against a direct computation with
the student; the teacher beside it; the harness stays optional."""

import re
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.train.cli import app
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.loop import run_training

SPEECH = [
    "now is the winter of our discontent",
    "made glorious summer by this sun of york",
    "and all the clouds that lour'd upon our house",
    "in the deep bosom of the ocean buried.",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Speeches of lower-case lines (the tiny teacher's characters), between speaker names."""
    d = tmp_path_factory.mktemp("heldout")
    words = " ".join(SPEECH).replace(".", "").split()
    speeches = []
    for j in range(12):
        lines = [" ".join(words[(j + 3 * k) % len(words) :][:6]) + ("," if k < 3 else ".") for k in range(4)]
        speeches.append("**GLOUCESTER**  \n" + "  \n".join(lines) + "\n")
    (d / "play.md").write_text("\n".join(speeches))
    return d


@pytest.fixture(scope="module")
def runs(tiny_shards, block_shards, tmp_path_factory):
    d = tmp_path_factory.mktemp("lm_eval")
    out = {}
    for name, shards in (("full", tiny_shards), ("block", block_shards)):
        out[name] = d / name
        run_training(TrainConfig(shards=str(shards), out=str(out[name]), student="tiny", steps=2, progress=False))
    return out


def direct(run, docs):
    """Each task's metric computed with the student itself: the chain scores of `likelihood` on BOS + text, and
    the sampler at temperature 0 for the generation task."""
    from ar2mdm.student.block_sampler import block_generate
    from ar2mdm.student.denoise import denoise
    from ar2mdm.train.checkpoint import load_student, run_tokenizer
    from ar2mdm.train.likelihood import chain_scores

    model, _ = load_student(run)
    tok = run_tokenizer(run)

    def ids(text):
        return [tok.bos_token_id] + tok(text, add_special_tokens=False)["input_ids"]

    def logp(context, cont):
        stripped = context.rstrip()  # the harness scores a context's trailing white space with the continuation
        context, cont = stripped, context[len(stripped) :] + cont
        whole, start = ids(context + cont), len(ids(context))
        cut = max(0, len(whole) - model.config.max_positions)  # the newest tokens where the row is too long
        lp, greedy = chain_scores(model, whole[cut:], max(1, start - cut))
        return float(lp.sum()), bool(greedy.all())

    choice = [max(range(4), key=lambda c: logp(d["context"], d["choices"][c])[0]) == d["gold"] for d in docs["choice"]]
    cloze = [logp(d["context"], " " + d["target"]) for d in docs["cloze"]]
    hits = []
    for j, d in enumerate(docs["cloze"]):
        x = torch.tensor([ids(d["context"])[-(model.config.max_positions - 8) :]])  # room for 8 new tokens
        if model.config.block_size:
            y, _ = block_generate(model, x, 8, temperature=0.0, seeds=[j], stop_ids=(tok.eos_token_id,))
        else:
            y = denoise(model, torch.cat([x, torch.full((1, 8), model.config.mask_id)], 1), 8, temperature=0.0,
                        remasking="low-confidence", seeds=[j], stop_ids=(tok.eos_token_id,))  # fmt: skip
        new = [t for t in y[0, x.shape[1] :].tolist() if t < model.config.vocab_size]
        new = new[: new.index(tok.eos_token_id)] if tok.eos_token_id in new else new
        word = re.search(r"([A-Za-z][A-Za-z']*)", tok.decode(new).split("\n")[0])
        hits.append(bool(word) and word.group(1).lower() == d["target"].lower())
    return {
        "choice": sum(choice) / len(choice),
        "cloze_acc": sum(g for _, g in cloze) / len(cloze),
        "cloze_ppl": float(torch.tensor([-lp for lp, _ in cloze]).mean().exp()),
        "continue": sum(hits) / len(hits),
    }


@pytest.mark.parametrize("kind", ["full", "block"])
def test_local_tasks_score_what_the_student_computes_and_the_teacher_sits_beside(kind, runs, corpus, tiny_teacher):
    pytest.importorskip("lm_eval")
    from ar2mdm.train.config import LmEvalConfig
    from ar2mdm.train.lm_eval_run import run_lm_eval
    from ar2mdm.train.tasks import make_docs, speeches

    cfg = LmEvalConfig(run=str(runs[kind]), teacher=str(tiny_teacher), heldout=str(corpus), docs=6)
    res = run_lm_eval(cfg)
    got = {(r["task"], r["metric"]): r for r in res["table"]}
    made = make_docs(speeches(str(corpus)), 6, 0)
    want = direct(runs[kind], {"choice": made["heldout_choice"], "cloze": made["heldout_cloze"]})
    assert len(made["heldout_choice"]) == len(made["heldout_cloze"]) == 6
    assert got["heldout_choice", "acc"]["student"] == pytest.approx(want["choice"])
    assert got["heldout_cloze", "acc"]["student"] == pytest.approx(want["cloze_acc"])
    assert got["heldout_cloze", "perplexity"]["student"] == pytest.approx(want["cloze_ppl"], rel=1e-4)
    assert got["heldout_continue", "exact_match"]["student"] == pytest.approx(want["continue"])
    for row in res["table"]:  # the teacher on the same tasks, and what the student kept of it
        assert row["teacher"] is not None and ("kept" in row or not row["teacher"] or not row["student"])


def test_bad_model_args_and_tasks_are_one_line(runs, corpus):
    pytest.importorskip("lm_eval")
    runner = CliRunner()
    base = ["lm-eval", str(runs["block"]), "--heldout", str(corpus), "--docs", "2", "--teacher", "none"]
    r = runner.invoke(app, base + ["--model-args", "top_k=5"])
    assert r.exit_code != 0 and "top_k not supported" in r.output and len(r.output.strip().splitlines()) == 1
    r = runner.invoke(app, base + ["--tasks", "heldout,no_such_task"])
    assert r.exit_code != 0 and "no_such_task" in r.output and len(r.output.strip().splitlines()) == 1


def test_kdtrain_runs_without_the_harness(runs, tmp_path):
    """lm_eval made unimportable: kdtrain still samples, and lm-eval says what to install in one line."""
    code = f"""
import sys
class NoHarness:
    def find_spec(self, name, path=None, target=None):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError("no lm_eval here")
sys.meta_path.insert(0, NoHarness())
from typer.testing import CliRunner
from ar2mdm.train.cli import app
r = CliRunner().invoke(app, ["sample", {str(runs["block"])!r}, "--length", "4", "--raw"])
assert r.exit_code == 0, r.output
r = CliRunner().invoke(app, ["lm-eval", {str(runs["block"])!r}, "--teacher", "none"])
print(r.exit_code, r.output.strip())
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip().splitlines()[-1].startswith("2 error: ") and "pip install 'ar2mdm[eval]'" in r.stdout


def test_rolling_windows_score_every_token_once(runs):
    """loglikelihood_rolling: a text longer than max_length cut into windows, every token scored once given the
    window before it: the sum of the chain scores of the windows the harness makes."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from ar2mdm.train.harness import StudentLM
    from ar2mdm.train.likelihood import chain_scores

    lm = StudentLM(pretrained=str(runs["block"]), device="cpu", max_length=12)
    text = " ".join(SPEECH)
    got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
    ids = lm.tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, lm.prefix_token_id, 12, 1)]
    assert sum(len(t) for _, t in windows) == len(ids) > 12 * 3  # several windows, every token once
    want = sum(float(chain_scores(lm.model, c + t, len(c))[0].sum()) for c, t in windows)
    assert got == pytest.approx(want, rel=1e-6)


def test_an_exported_folder_scores_as_its_run(runs, tmp_path):
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance

    from ar2mdm.train.export import export
    from ar2mdm.train.harness import StudentLM

    folder = export(str(runs["block"]), str(tmp_path / "hf"))
    reqs = [Instance("loglikelihood", {}, (SPEECH[0], " " + SPEECH[1]), 0)]
    ran, exported = (StudentLM(pretrained=str(p), device="cpu") for p in (runs["block"], folder))
    assert exported.max_length == ran.max_length
    (got, greedy), (want, want_greedy) = (m.loglikelihood(reqs, disable_tqdm=True)[0] for m in (exported, ran))
    assert got == pytest.approx(want, abs=1e-4) and greedy == want_greedy
