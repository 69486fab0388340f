"""On-policy rounds on the trainer's side: rows without truth get the KD term alone, a run continues on a
mixture of shard folders (resumed exactly), the states a student visits, and the rounds driver end to end."""

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.schemas import Manifest
from ar2mdm.schemas.states import read_states
from ar2mdm.train.cli import app
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import BatchLoader, Source, TargetSpec, collate, rows_of_shard
from ar2mdm.train.loop import run_training
from ar2mdm.train.losses import SparseTargets, masked_losses
from ar2mdm.train.objective import batch_loss

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def round_one(tiny_shards, tiny_teacher, tmp_path_factory):
    """A run trained 4 of 8 steps, 6 states of its trajectories, and the teacher's targets on them."""
    d = tmp_path_factory.mktemp("round")
    run = d / "run"
    run_training(TrainConfig(shards=str(tiny_shards), out=str(run), student="tiny", steps=8, stop_at=4, progress=False))
    states = d / "states.jsonl"
    r = runner.invoke(
        app, ["sample", str(run), "--num", "6", "--length", "31", "--steps", "8", "--states", str(states)]
    )
    assert r.exit_code == 0, r.output
    built = d / "round-1"
    run_build(
        BuildConfig(
            states=str(states),
            teacher=str(tiny_teacher),
            out=str(built),
            seq_len=32,
            mode="topk",
            k=3,
            window=4,
            top_n=4,
            progress=False,
        )
    )  # fmt: skip  (the corpus shards' kind of targets)
    return run, states, built


def test_the_states_a_student_visits(round_one):
    run, states, _ = round_one
    recs = read_states(states)
    assert len(recs) == 6 and len({r.example_id for r in recs}) == 6
    for r in recs:
        assert r.steps == 8 and 0 <= r.step < 8 and r.prompt_len == 0 and len(r.input_ids) == 32
        # before step s of 8 over 31 positions, int(31 (1 - s/8)) stay masked (the linear schedule)
        assert len(r.mask_positions) == 31 - (31 - int(31 * (1 - r.step / 8)))
        assert r.source.run == str(run) and r.source.step == 4
    m = Manifest.load(round_one[2])
    assert m.states["rows"] == 6 and m.states["step"] == 4 and m.mask_dependent_targets


def test_rows_without_truth_get_the_kd_term_alone(round_one, tiny_shards):
    """A batch of a corpus row and a state row: the corpus row's loss is (1-λ)·MDM + λ·KD, the state row's is its
    KD term, and what the state row holds at its masked positions (the student's own tokens) changes nothing."""
    _, _, built = round_one
    corpus = next(rows_of_shard(next(Path(tiny_shards).glob("part-*.parquet"))))
    state = next(rows_of_shard(next(Path(built).glob("part-*.parquet")), truth=False))
    spec = replace(TargetSpec.from_manifest(Manifest.load(tiny_shards)), states=True)
    cfg = TrainConfig(shards=str(tiny_shards), lam=0.3)
    batch = collate([corpus, state], spec)
    torch.manual_seed(0)
    logits = torch.randn(int(batch.mask.sum()), Manifest.load(tiny_shards).tokenizer.vocab_size)
    loss, _ = batch_loss(logits, batch, cfg.objective(spec), spec)
    inf = torch.full((len(batch.positions),), float("inf"))  # exact supports (topk, all candidates kept): no tail
    targets = SparseTargets(batch.target_ids, batch.target_logprobs, 1.0, cfg.tail_for(True), inf)
    nll, kl = masked_losses(logits, batch.input_ids.flatten()[batch.positions], targets)
    row = batch.positions // 32
    per = lambda v, b: float(v[row == b].sum()) / 32  # noqa: E731
    want = ((1 - 0.3) * per(nll, 0) + 0.3 * per(kl, 0) + per(kl, 1)) / 2
    assert float(loss) == pytest.approx(want, rel=1e-5)
    other = replace(state, input_ids=state.input_ids.copy())
    other.input_ids[state.mask_positions] = (other.input_ids[state.mask_positions] + 7) % 40
    again = batch_loss(logits, collate([corpus, other], spec), cfg.objective(spec), spec)[0]
    assert float(again) == pytest.approx(float(loss))


def test_a_mixture_draws_its_shares_and_marks_the_rows(round_one, tiny_shards):
    _, _, built = round_one
    main, st = Manifest.load(tiny_shards), Manifest.load(built)
    loader = BatchLoader([Source(Path(tiny_shards), main, 0.75), Source(Path(built), st, 0.25)], 0, 1, "s",
                         batch_size=8, shuffle_buffer=4)  # fmt: skip
    it = iter(loader)
    truth = torch.cat([next(it).truth for _ in range(100)])
    assert 0.70 < float(truth.float().mean()) < 0.80
    again = iter(loader)
    assert torch.equal(torch.cat([next(again).truth for _ in range(100)]), truth)  # seeded


def test_a_run_continues_on_a_mixture_and_resumes_it_exactly(round_one, tiny_shards, tmp_path):
    run, _, built = round_one
    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(run, a)
    shutil.copytree(run, b)
    base = dict(shards=str(tiny_shards), student="tiny", steps=8, resume=True, progress=False, mix=[f"{built}:0.5"])
    run_training(TrainConfig(out=str(a), **base))  # step 4 -> 8 on the mixture
    run_training(TrainConfig(out=str(b), stop_at=6, **base))  # the same, stopped at 6 and resumed
    run_training(TrainConfig(out=str(b), **base))
    wa, wb = (load_file(str(p / "checkpoint" / "model.safetensors")) for p in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    metrics = [json.loads(x) for x in (a / "metrics.jsonl").read_text().splitlines()]
    assert metrics[-1]["step"] == 8 and json.loads((a / "checkpoint" / "config.json").read_text())["step"] == 8


def test_a_mixture_that_does_not_fit_is_one_line(round_one, tiny_shards, tmp_path):
    run, _, built = round_one
    for args, msg in (
        (["--mix", f"{built}:1.5"], "give FOLDER:SHARE with a share between 0 and 1"),
        (["--mix", f"{built}:0.6", "--mix", f"{built}:0.5"], "--mix shares sum to 1.1"),
        (["--mix", f"{tmp_path / 'nope'}:0.5"], "does not exist"),
        (["--mix", f"{built}:0.5", "--lambda", "0"], "--lambda 0 with a student's states"),
    ):
        r = runner.invoke(app, ["run", str(tiny_shards), "--out", str(tmp_path / "x"), "--student", "tiny", *args])
        assert r.exit_code == 2 and msg in r.output and "Traceback" not in r.output, r.output


@pytest.mark.slow
def test_the_rounds_driver_end_to_end(tiny_teacher, tiny_corpus, tmp_path):
    """Two rounds on the tiny teacher: every stage as its own process; a rerun does nothing again."""
    cmd = [sys.executable, str(ROOT / "scripts" / "rounds.py"), "--out", str(tmp_path / "r"), "--teacher",
           str(tiny_teacher), "--corpus", str(tiny_corpus), "--seq-len", "24", "--corpus-rows", "6", "--state-rows",
           "4", "--rounds", "2", "--steps", "6", "--sample-steps", "4", "--k", "2"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    cfg = json.loads((tmp_path / "r" / "run" / "checkpoint" / "config.json").read_text())
    assert cfg["step"] == 6 and len(cfg["train"]["mix"]) == 2
    assert Manifest.load(tmp_path / "r" / "round-2").states["step"] == 4
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "kdtrain.cli run" not in again.stderr  # nothing left to train
    losses = [json.loads(x)["loss"] for x in (tmp_path / "r" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(losses).all()


def test_a_mixture_of_another_tokenizer_is_one_line(tiny_shards, tmp_path):
    """Shards built by a teacher of another vocabulary (FIM tokens added) do not mix with the run's."""
    from tests.tiny import TEXT, save_tiny_teacher

    other = save_tiny_teacher(tmp_path / "fim_teacher", fim=True)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text(TEXT * 3)
    run_build(BuildConfig(corpus=str(tmp_path / "c"), teacher=str(other), out=str(tmp_path / "o"), seq_len=32, k=3,
                          window=4, top_n=4, max_sequences=4, progress=False))  # fmt: skip
    r = runner.invoke(app, ["run", str(tiny_shards), "--out", str(tmp_path / "x"), "--mix", f"{tmp_path / 'o'}:0.5"])
    assert r.exit_code == 2 and "another tokenizer than" in r.output and "Traceback" not in r.output, r.output
