"""SFT end to end: chats rendered alike in build, eval and sample; the response-only bound; the end-of-turn stop."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import ar2mdm.shared.masking as masking
import ar2mdm.train.evaluate as evaluate_mod
import ar2mdm.train.sample as sample_mod
from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.schemas import Manifest
from ar2mdm.shared.shards import read_shard
from ar2mdm.student.denoise import cut_at_stop, denoise
from ar2mdm.train.checkpoint import load_meta, run_tokenizer
from ar2mdm.train.cli import app
from ar2mdm.train.config import EvalConfig, TrainConfig
from ar2mdm.train.evaluate import _rows_from, evaluate
from ar2mdm.train.loop import run_training
from ar2mdm.train.sample import prompt_row
from tests.tiny import save_tiny_teacher

runner = CliRunner()
SEQ = 48
CHATS = [
    ("where is the heath?", "upon the heath."),
    ("who comes here?", "a drum, a drum! macbeth doth come."),
    ("when shall we meet?", "when the battle's lost and won."),
    ("what is foul?", "fair is foul."),
] * 3
HELD_OUT = [("what bloody man is that?", "he can report."), ("is this a dagger?", "a dagger of the mind.")]


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def chats_file(path: Path, pairs) -> Path:
    rows = [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("sft")
    teacher = save_tiny_teacher(d / "teacher", chat=True)
    shards = d / "shards"
    run_build(
        BuildConfig(
            corpus=str(chats_file(d / "train.jsonl", CHATS)),
            teacher=str(teacher),
            out=str(shards),
            task="sft",
            mode="mc",
            k=2,
            seq_len=SEQ,
            top_n=4,
            progress=False,
        )
    )
    run = d / "run"
    run_training(TrainConfig(shards=str(shards), out=str(run), student="tiny", steps=2, batch_size=4, progress=False))
    return shards, run, chats_file(d / "heldout.jsonl", HELD_OUT)


def test_the_template_is_applied_identically_in_build_eval_and_sample(sft_run):
    shards, run, _ = sft_run
    m = Manifest.load(shards)
    assert m.task == "sft" and m.sft_format == "chat-template"
    data = read_shard(shards / m.shards[0].file)
    meta, tok = load_meta(run), run_tokenizer(run)
    assert meta["task"] == "sft" and tok.chat_template  # the run's tokenizer carries the template
    rows, _ = _rows_from(
        shards.parent / "train.jsonl", meta, tok, max_rows=64, by_line=False, text_field="text", task="sft"
    )
    for r in range(data.rows):  # eval renders each training chat to the very row the build wrote
        j = int(data.example_ids[r].split("-")[1])
        np.testing.assert_array_equal(rows[j].input_ids, data.input_ids[r])
        assert rows[j].prompt_len == data.prompt_len[r]
        # and sample starts from the build's prompt: BOS + <|im_start|>u QUESTION<|im_end|>\n<|im_start|>a
        want = data.input_ids[r, : data.prompt_len[r]].tolist()
        assert prompt_row(meta, tok, CHATS[j][0], chat=True) == want
        start, end = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
        assert want[1:] == [start, *ids(tok, f"u {CHATS[j][0]}"), end, *ids(tok, "\n"), start, *ids(tok, "a ")]


def test_eval_scores_the_responses_only_against_a_hand_count(sft_run, monkeypatch):
    shards, run, heldout = sft_run
    tok = run_tokenizer(run)
    seen = []
    real = masking.sample_count_masks

    def recording(maskable, counts, g):
        mask = real(maskable, counts, g)
        seen.append(mask.clone())
        return mask

    monkeypatch.setattr(evaluate_mod, "sample_count_masks", recording)
    res = evaluate(EvalConfig(run=str(run), data=str(heldout), mask_draws=3, row_estimates=True))
    assert res["task"] == "sft"
    # by hand: one token per character of the answer, and the <|im_end|> that ends it; no prompt, no template
    # tokens, no EOS padding
    assert res["row_tokens"] == [len(a) + 1 for _, a in HELD_OUT]
    assert res["tokens"] == sum(len(a) + 1 for _, a in HELD_OUT)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    rows, _ = _rows_from(heldout, load_meta(run), tok, max_rows=64, by_line=False, text_field="text", task="sft")
    for mask in seen:
        for b, row in enumerate(rows):
            pos = mask[b].nonzero()[:, 0]
            plen, n = row.prompt_len, len(HELD_OUT[b][1]) + 1
            assert pos.min() >= plen and pos.max() < plen + n
            assert row.input_ids[plen + n - 1] == end and row.input_ids[plen : plen + n - 1].tolist() == ids(
                tok, HELD_OUT[b][1]
            )


class Scripted(torch.nn.Module):
    """A 'student' that predicts a fixed row: logits favour ``want[j]`` at every masked position j."""

    def __init__(self, want: list[int], vocab: int):
        super().__init__()
        self.want, self.vocab, self.calls = torch.tensor(want), vocab, 0
        self.config = type("C", (), {"mask_id": vocab})()

    def forward(self, x, masked):
        self.calls += 1
        pos = masked.nonzero()[:, 1]
        logits = torch.zeros(len(pos), self.vocab)
        logits[torch.arange(len(pos)), self.want[pos]] = 10.0 + pos.float()  # later positions more confident
        return logits


@pytest.mark.parametrize("span_length", [None, 2])
def test_nothing_after_the_first_end_of_turn(span_length):
    stop, mask = 7, 9
    want = [1, 3, 4, 5, stop, 6, 6, stop, 6, 6]  # prompt (1 token), answer, end of turn, what a sampler must drop
    model = Scripted(want, vocab=9)
    x = torch.tensor([[1] + [mask] * 9])
    out = denoise(
        model, x, steps=9, temperature=0, remasking="low-confidence", span_length=span_length, stop_ids=(stop,)
    )
    answer = cut_at_stop(out[0, 1:].tolist(), (stop,))
    assert answer == [3, 4, 5]
    assert cut_at_stop(out[0, 1:].tolist(), (stop,), keep_stop=True) == [3, 4, 5, stop]
    if span_length:  # blocks after the one that ended the turn are never computed
        assert model.calls == 2 and (out[0, 5:] == mask).all()  # one step per block of 2 (9 steps, 5 blocks)


def test_chat_sample_prints_the_answer_up_to_its_end_of_turn(sft_run, monkeypatch):
    _, run, _ = sft_run
    tok = run_tokenizer(run)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    scripted = ids(tok, "upon the heath") + [end] + ids(tok, "zz")
    seen = {}

    def fake_denoise(
        model, x, steps, *, temperature, remasking, seeds, span_length, stop_ids, on_step, return_forwards
    ):
        seen["prompt"], seen["stops"], seen["span"] = x[0].tolist(), stop_ids, span_length
        y = x.clone()
        n = int((x[0] == model.config.mask_id).sum())
        y[0, -n:] = torch.tensor((scripted + [end] * n)[:n])
        return y, torch.ones(len(x), dtype=torch.long)

    monkeypatch.setattr(sample_mod, "denoise", fake_denoise)
    r = runner.invoke(
        app, ["sample", str(run), "--prompt", "where is the heath?", "--length", "20", "--span-length", "4"]
    )
    assert r.exit_code == 0, r.output
    assert r.output.splitlines()[1] == "completion: " + tok.decode(
        ids(tok, "upon the heath")
    )  # SFT runs chat by default
    assert end in seen["stops"] and seen["span"] == 4
    assert seen["prompt"][:-20] == prompt_row(load_meta(run), tok, "where is the heath?", chat=True)
    r = runner.invoke(app, ["sample", str(run), "--prompt", "where is the heath?", "--length", "20", "--no-chat"])
    assert r.exit_code == 0 and tok.decode(ids(tok, "zz")) in r.output  # without --chat nothing is cut
    assert seen["prompt"][:-20] == [1, *ids(tok, "where is the heath?")] and seen["stops"] == ()  # plain prompt
    r = runner.invoke(app, ["fill", str(run), "--chat", "--prompt", "where is the heath?", "--text", "upon the [MASK]"])
    assert r.exit_code == 0 and r.output.splitlines()[1].startswith("[MASK] 1:")


def test_the_export_carries_the_template_and_stops_like_kdtrain(sft_run, tmp_path):
    from transformers import AutoModelForMaskedLM, AutoTokenizer

    from ar2mdm.train.export import export

    _, run, _ = sft_run
    d = export(str(run), str(tmp_path / "x"))
    model = AutoModelForMaskedLM.from_pretrained(d, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    assert tok.chat_template and model.config.chat
    assert tok.convert_tokens_to_ids("<|im_end|>") in model.config.stop_token_ids
    meta = load_meta(run)
    ids = torch.tensor([prompt_row(meta, tok, "where is the heath?", chat=True)])
    out = model.diffusion_generate(ids, max_new_tokens=12, steps=12, temperature=1.0, seed=3, span_length=4)
    mine = denoise(
        model.student,
        torch.cat([ids, torch.full((1, 12), model.config.mask_token_id)], 1),
        12,
        temperature=1.0,
        seeds=[3],
        span_length=4,
        stop_ids=tuple(model.config.stop_token_ids),
    )
    want = cut_at_stop(mine[0, ids.shape[1] :].tolist(), model.config.stop_token_ids, keep_stop=True)
    assert out[0, ids.shape[1] :].tolist() == want


def test_a_chat_students_states_keep_the_prompt_visible_and_train_as_sft_rows(sft_run, tmp_path):
    """A chat student's states: the prompt (chat template included) is the row's prompt, never masked; the
    teacher's targets on them build with --task sft, and a run continues on the mixture."""
    from ar2mdm.schemas.states import read_states

    shards, run, _ = sft_run
    states = tmp_path / "states.jsonl"
    args = ["sample", str(run), "--prompt", "where is the heath?", "--num", "3", "--steps", "8", "--span-length", "4"]
    n = len(prompt_row(load_meta(run), run_tokenizer(run), "where is the heath?", chat=True))
    r = runner.invoke(app, args + ["--length", str(SEQ - n), "--states", str(states), "--states-per-sample", "2"])
    assert r.exit_code == 0, r.output
    recs = read_states(states)
    assert recs and all(s.prompt_len == n and min(s.mask_positions) >= n for s in recs)
    teacher = Path(Manifest.load(shards).teacher.path)
    out = tmp_path / "round"
    run_build(BuildConfig(states=str(states), teacher=str(teacher), out=str(out), task="sft", mode="mc", k=2,
                          seq_len=SEQ, top_n=4, progress=False))  # fmt: skip
    assert Manifest.load(out).task == "sft"
    res = run_training(TrainConfig(shards=str(shards), out=str(tmp_path / "run"), student="tiny", steps=2, batch_size=4,
                                   mix=[f"{out}:0.5"], progress=False))  # fmt: skip
    assert res["steps"] == 2
