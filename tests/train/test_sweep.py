"""`kdtrain sweep`: a grid over one precompute, evaluated on held-out text; λ schedules."""

import csv
import json

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.shared.errors import UserError
from ar2mdm.train.cli import app
from ar2mdm.train.losses import kd_weight
from ar2mdm.train.sweep import SweepConfig, parse_assignments, run_sweep
from tests.tiny import TEXT

runner = CliRunner()


@pytest.fixture()
def heldout(tmp_path):
    p = tmp_path / "heldout.txt"
    p.write_text("\n".join(reversed(TEXT.split(". "))) * 3)  # other text than the shards' rows
    return p


def test_a_2x2_sweep_runs_evaluates_and_skips_finished_points(tiny_shards, heldout, tmp_path):
    out = tmp_path / "sw"
    args = [
        "sweep",
        str(tiny_shards),
        "--out",
        str(out),
        "--grid",
        "lambda=0,0.5",
        "--grid",
        "temperature=1,2",
        "--set",
        "steps=4",
        "--set",
        "student=tiny",
        "--set",
        "batch_size=4",
        "--set",
        "log_every=1",
        "--eval-data",
        str(heldout),
        "--eval-rows",
        "8",
        "--eval-mask-draws",
        "2",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 0, r.output
    rows = list(csv.DictReader(open(out / "sweep.csv")))
    assert {(row["lambda"], row["temperature"]) for row in rows} == {
        ("0.0", "1.0"),
        ("0.0", "2.0"),
        ("0.5", "1.0"),
        ("0.5", "2.0"),
    }
    assert all(float(row["nll_bound"]) > 0 and float(row["nll_bound_se"]) > 0 and row["steps"] == "4" for row in rows)
    # λ = 0 ignores the temperature: same seed, same data order, same eval masks -> the same student and number
    same = {row["temperature"]: row["nll_bound"] for row in rows if row["lambda"] == "0.0"}
    assert same["1.0"] == same["2.0"]
    assert len({row["nll_bound"] for row in rows if row["lambda"] == "0.5"}) == 2
    md = (out / "sweep.md").read_text()
    assert "± " in md and (out / "sweep.png").stat().st_size > 1000
    # paired differences: the two λ = 0 runs are the same student, so their paired Δ is exactly 0 ± 0
    assert md.count("| +0.000 ± 0.000 |") + md.count("| 0 |") >= 2
    # a rerun trains nothing again; deleting eval.json re-evaluates without retraining, to the same number
    stamp = {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint/model.safetensors")}
    first = json.loads((out / "lambda=0.5,temperature=2.0" / "eval.json").read_text())
    (out / "lambda=0.5,temperature=2.0" / "eval.json").unlink()
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and stamp == {p: p.stat().st_mtime_ns for p in out.glob("*/checkpoint/model.safetensors")}
    again = json.loads((out / "lambda=0.5,temperature=2.0" / "eval.json").read_text())
    assert again["nll_bound"] == first["nll_bound"] and again["train_kd"] == first["train_kd"]


def test_parallel_points_give_the_same_results_as_sequential(tiny_shards, heldout, tmp_path):
    base = dict(
        shards=str(tiny_shards),
        grid={"lam": [0.0, 0.5]},
        eval_data=str(heldout),
        eval_rows=8,
        eval_mask_draws=2,
        fixed={"steps": 3, "student": "tiny", "batch_size": 4},
    )
    seq = run_sweep(SweepConfig(out=str(tmp_path / "a"), **base))
    par = run_sweep(SweepConfig(out=str(tmp_path / "b"), parallel=2, **base))
    assert [r["nll_bound"] for r in seq] == pytest.approx([r["nll_bound"] for r in par], rel=1e-4)


def test_grid_parsing_refuses_unknown_settings_and_bad_values():
    assert parse_assignments(["lambda=0,0.5", "tail=renormalize,bucket", "init-from=none"], True) == {
        "lam": [0.0, 0.5],
        "tail": ["renormalize", "bucket"],
        "init_from": [None],
    }
    with pytest.raises(UserError, match="not a kdtrain run setting"):
        parse_assignments(["lamda=0.5"], True)
    with pytest.raises(UserError, match="is not a float"):
        parse_assignments(["temperature=hot"], True)
    with pytest.raises(UserError, match="KEY=VALUE"):
        parse_assignments(["steps"], False)


def test_kd_weight_schedules_and_t_modes():
    t = torch.tensor([0.1, 0.5, 0.9])
    assert torch.allclose(kd_weight(0.5, 0.3, t), torch.full((3,), 0.5))
    assert torch.allclose(kd_weight(0.5, 0.25, t, "linear-decay"), torch.full((3,), 0.375))
    assert torch.allclose(kd_weight(0.5, 1.0, t, "cosine-decay"), torch.zeros(3), atol=1e-7)
    assert torch.allclose(kd_weight(0.5, 0.25, t, "linear-warmup"), torch.full((3,), 0.25))
    assert torch.allclose(kd_weight(0.5, 0.0, t, "constant", "low-t"), torch.tensor([0.9, 0.5, 0.1]))
    assert torch.allclose(kd_weight(0.8, 0.0, t, "constant", "high-t"), torch.tensor([0.16, 0.8, 1.0]))  # capped at 1
    # the mean of g(t) over t ~ U(0, 1) is 1, so λ keeps its meaning on average
    u = torch.linspace(0, 1, 100001)
    assert float(kd_weight(0.4, 0.0, u, "constant", "low-t").mean()) == pytest.approx(0.4, abs=1e-4)


def test_a_scheduled_run_trains_and_logs_its_mean_lambda(tiny_shards, tmp_path):
    r = runner.invoke(
        app,
        [
            "run",
            str(tiny_shards),
            "--out",
            str(tmp_path / "s"),
            "--student",
            "tiny",
            "--steps",
            "4",
            "--batch-size",
            "4",
            "--log-every",
            "1",
            "--lambda-schedule",
            "linear-decay",
            "--lambda-t",
            "low-t",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    lams = [json.loads(line)["lambda"] for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert len(lams) == 4 and lams[-1] < lams[0]  # decays over training


def test_lambda_schedule_auto_ramps_kd_in_only_when_adapting_an_ar_model(tiny_shards, tiny_teacher, tmp_path):
    from ar2mdm.train.config import TrainConfig

    assert TrainConfig(shards="s").schedule == "constant"
    assert TrainConfig(shards="s", init_from="t").schedule == "linear-warmup"
    assert TrainConfig(shards="s", init_from="t", lambda_schedule="constant").schedule == "constant"
    with pytest.raises(UserError, match="lambda-schedule must be one of auto"):
        TrainConfig(shards="s", lambda_schedule="warmup").check()
    lams = {}
    for name, extra in (("scratch", ["--student", "tiny"]), ("warm", ["--init-from", str(tiny_teacher)])):
        r = runner.invoke(
            app,
            [
                "run",
                str(tiny_shards),
                "--out",
                str(tmp_path / name),
                "--steps",
                "4",
                "--batch-size",
                "4",
                "--log-every",
                "1",
                "--no-progress",
                *extra,
            ],
        )
        assert r.exit_code == 0, r.output
        lams[name] = [
            json.loads(line).get("lambda") for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        ]
    assert lams["scratch"] == [None] * 4  # constant λ: the scalar path, no per-row λ logged
    # linear-warmup at progress 0, 1/4, 2/4, 3/4 of 4 steps: λ·min(1, 2p) = 0, 0.25, 0.5, 0.5
    assert lams["warm"] == pytest.approx([0.0, 0.25, 0.5, 0.5])


def test_tail_auto_is_bucket_with_a_truncated_support_and_renormalize_with_an_exact_one(tiny_shards):
    from dataclasses import replace
    from itertools import islice

    from ar2mdm.schemas import Manifest
    from ar2mdm.student.model import Student, StudentConfig
    from ar2mdm.train.config import TrainConfig
    from ar2mdm.train.data import TargetSpec, collate, rows_of_shard
    from ar2mdm.train.objective import step_losses

    m = Manifest.load(tiny_shards)
    spec = TargetSpec.from_manifest(m)
    assert spec.exact_support  # topk, top_n 4 >= k 3 + 1
    rows = list(islice(rows_of_shard(tiny_shards / m.shards[0].file), 4))
    batch = collate(rows, replace(spec, top_n=2))  # truncated to 2 entries: a real tail
    torch.manual_seed(0)
    model = Student(
        StudentConfig(
            vocab_size=m.tokenizer.vocab_size,
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            num_kv_heads=2,
            intermediate_size=64,
        )
    )
    kd = {}
    for tail in ("auto", "renormalize", "bucket"):
        for exact in (True, False):
            cfg = TrainConfig(shards="", lam=1.0, temperature=2.0, tail=tail)
            s = replace(spec, exact_support=exact)
            kd[tail, exact] = step_losses(model, batch, cfg.objective(s), s, mask_id=model.config.mask_id)[1]["kd"]
    assert kd["auto", True] == kd["renormalize", True] and kd["auto", False] == kd["bucket", False]
    assert kd["bucket", False] != kd["renormalize", False]


def test_paired_diff_by_hand():
    """Δ = Σ(row nll differences) / Σ tokens, with the delta-method standard error over rows, worked by hand."""
    from ar2mdm.train.sweep import paired_diff

    a = {"row_nll": [10.0, 20.0, 30.0], "row_tokens": [5.0, 5.0, 10.0]}
    b = {"row_nll": [9.0, 21.0, 27.0], "row_tokens": [5.0, 5.0, 10.0]}
    d, se = paired_diff(a, b)
    # d = (1 - 1 + 3) / 20; residuals 1-0.75, -1-0.75, 3-1.5; se = sqrt(Σ res² / (3·2)) / mean(tokens)
    assert d == pytest.approx(0.15)
    assert se == pytest.approx((5.375 / 6) ** 0.5 / (20 / 3))
