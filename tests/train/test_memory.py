"""--batch-size auto (train/memory.py): the search, the split into micro-batches, the trial step's side effects,
and the run it gives."""

import math

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.student.model import Student
from ar2mdm.train.cli import app
from ar2mdm.train.data import TargetSpec, load_shard_manifest
from ar2mdm.train.device import autocast_for
from ar2mdm.train.loop import run_training
from ar2mdm.train.memory import auto_batch, even_split, largest_fitting, step_peak, worst_batch
from ar2mdm.train.presets import student_config
from tests.train.test_trainer import tcfg, weights


def test_largest_fitting_finds_the_edge_in_few_trials():
    for most in range(1, 70):
        for edge in range(0, 75):  # fits(b) holds for b <= edge
            tried = []

            def fits(b, edge=edge):
                assert 1 <= b <= most, b
                tried.append(b)
                return b <= edge

            assert largest_fitting(fits, most) == min(edge, most), (most, edge)
            assert len(tried) <= 2 * math.ceil(math.log2(most)) + 2, (most, edge, tried)


def test_even_split_covers_the_step_with_the_fewest_rows_over():
    for rows in range(1, 120):
        for most in range(1, rows + 5):
            batch, accum = even_split(rows, most)
            assert batch <= most and batch * accum >= rows and accum == math.ceil(rows / most)
            assert batch * accum - rows < accum  # no micro-batch of this many steps would waste less
    assert even_split(1024, 700) == (512, 2) and even_split(16, 16) == (16, 1)


def test_the_trial_step_is_a_worst_case_batch_and_leaves_the_run_as_it_was(tiny_shards):
    m = load_shard_manifest(tiny_shards)
    spec = TargetSpec.from_manifest(m)
    V = m.tokenizer.vocab_size
    model = Student(student_config("tiny", V, m.seq_len))
    b = worst_batch(3, m.seq_len, spec.top_n, V, "cpu")
    assert bool(b.mask.all()) and torch.equal(b.positions, b.mask.flatten().nonzero()[:, 0])
    assert b.target_ids.shape == (3 * m.seq_len, spec.top_n) and int(b.target_ids.max()) < V  # never the mask id
    srt = b.target_ids.sort(-1).values
    assert bool((srt[:, 1:] != srt[:, :-1]).all())  # distinct ids, as a build writes
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    cfg = tcfg(tiny_shards, "unused")
    step_peak(model, b, cfg, spec, autocast_for("cpu", "auto"))
    assert torch.equal(torch.get_rng_state(), rng)  # the run's draws after it are the ones it would have made
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_auto_on_the_cpu_takes_the_step_in_one_micro_batch(tiny_shards):
    m = load_shard_manifest(tiny_shards)
    spec, L = TargetSpec.from_manifest(m), m.seq_len
    model = Student(student_config("tiny", m.tokenizer.vocab_size, L))
    ac = autocast_for("cpu", "auto")

    def auto(**kw):
        cfg = tcfg(tiny_shards, "unused", batch_size="auto", **kw)
        got, said = auto_batch(cfg, model, spec, seq_len=L, world=1, device="cpu", autocast=ac, fsdp=False)
        return got.batch_size, got.grad_accum, said

    assert auto()[:2] == (16, 1)  # the field's default
    assert auto(batch_tokens=13 * L)[:2] == (13, 1)
    assert auto(batch_tokens=40 * L)[:2] == (14, 3)  # at most the default per micro-batch, evenly: 3 x 14 >= 40
    assert "--batch-size auto: 14 x 3 (the CPU)" == auto(batch_tokens=40 * L)[2]


def test_auto_trains_as_the_micro_batches_it_chose_and_resumes_with_them(tiny_shards, tmp_path):
    L = load_shard_manifest(tiny_shards).seq_len
    run_training(tcfg(tiny_shards, tmp_path / "auto", batch_size="auto", batch_tokens=5 * L, steps=2))
    run_training(tcfg(tiny_shards, tmp_path / "five", batch_size=5, steps=2))
    wa, wb = weights(tmp_path / "auto"), weights(tmp_path / "five")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a run of 4-row micro-batches, resumed with --batch-size auto, continues as it was: its own 4 x 1
    run_training(tcfg(tiny_shards, tmp_path / "a", steps=4, save_every=2))
    run_training(tcfg(tiny_shards, tmp_path / "b", steps=4, save_every=2, stop_at=2))
    run_training(tcfg(tiny_shards, tmp_path / "b", steps=4, save_every=2, resume=True, batch_size="auto"))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_batch_size_on_the_command_line(tiny_shards, tmp_path):
    from ar2mdm.train.sweep import parse_value

    def run(*args):
        return CliRunner().invoke(app, ["run", str(tiny_shards), "--no-progress", "--student", "tiny", *args])

    r = run("--batch-size", "lots")
    assert r.exit_code == 2 and "must be a whole number or auto, got 'lots'" in r.output, r.output
    assert "Traceback" not in r.output
    r = run("--batch-size", "auto", "--grad-accum", "2")
    assert r.exit_code == 2 and "--batch-size auto sets --grad-accum" in r.output, r.output
    r = run("--batch-size", "0")
    assert r.exit_code == 2 and "--batch-size must be at least 1, got 0" in r.output, r.output
    r = run("--batch-size", "auto", "--steps", "1", "--out", str(tmp_path / "r"))
    assert r.exit_code == 0 and "--batch-size auto: 16 x 1 (the CPU)" in r.output, r.output
    assert parse_value("batch_size", "auto") == "auto" and parse_value("batch_size", "8") == 8


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_auto_on_cuda_finds_a_batch_that_trains(tiny_shards, tmp_path):
    L = load_shard_manifest(tiny_shards).seq_len
    res = run_training(
        tcfg(tiny_shards, tmp_path / "g", batch_size="auto", batch_tokens=64 * L, steps=2, device="cuda")
    )
    assert res["steps"] == 2 and math.isfinite(res["loss"])
