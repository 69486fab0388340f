import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from ar2mdm.schemas import Manifest
from ar2mdm.train.cli import app
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import RowStream
from ar2mdm.train.loop import run_training
from tests.tiny import DEVICES

runner = CliRunner()
REPO = Path(__file__).resolve().parents[2]


def tcfg(shards, out, **kw):
    base = dict(
        shards=str(shards),
        out=str(out),
        student="tiny",
        batch_size=4,
        steps=6,
        save_every=3,
        log_every=1,
        progress=False,
        lr=1e-3,
    )
    base.update(kw)
    return TrainConfig(**base)


def weights(run):
    return load_file(str(Path(run) / "checkpoint" / "model.safetensors"))


def test_trains_checkpoints_and_resumes_exactly(tiny_shards, tmp_path):
    res = run_training(tcfg(tiny_shards, tmp_path / "a"))
    assert res["steps"] == 6 and res["loss"] == res["loss"]
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert {"loss", "mdm", "kd", "lr", "tokens_per_s"} <= set(first)
    run_training(tcfg(tiny_shards, tmp_path / "b", stop_at=3))
    assert weights(tmp_path / "b").keys() == weights(tmp_path / "a").keys()
    run_training(tcfg(tiny_shards, tmp_path / "b", resume=True))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # and the interrupted run really was different at step 3
    run_training(tcfg(tiny_shards, tmp_path / "c", stop_at=3))
    assert any(not torch.equal(wa[k], v) for k, v in weights(tmp_path / "c").items())


def test_resume_is_exact_with_dataloader_workers(tiny_shards, tmp_path):
    run_training(tcfg(tiny_shards, tmp_path / "a", num_workers=2, steps=5, save_every=2))
    run_training(tcfg(tiny_shards, tmp_path / "b", num_workers=2, steps=5, save_every=2, stop_at=3))
    run_training(tcfg(tiny_shards, tmp_path / "b", num_workers=2, steps=5, save_every=2, resume=True))
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_training_reduces_the_loss(tiny_shards, tmp_path):
    run_training(tcfg(tiny_shards, tmp_path / "r", steps=40, save_every=100, lr=3e-3, log_every=1))
    recs = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    early = sum(r["loss"] for r in recs[:5]) / 5
    late = sum(r["loss"] for r in recs[-5:]) / 5
    assert late < 0.9 * early


def test_row_streams_cover_every_row_once_per_epoch(tiny_shards):
    m = Manifest.load(tiny_shards)
    total = sum(s.rows for s in m.shards)
    for consumers in (1, 2, len(m.shards) + 1):  # file split and row split
        seen = []
        for c in range(consumers):
            stream = RowStream(tiny_shards, m, c, consumers, seed=3, shuffle_buffer=4)
            n = stream.rows_per_epoch(m)
            it = iter(stream)
            rows = [next(it) for _ in range(n)]
            assert all(e == 0 for e, _ in rows)
            seen += [r.example_id for _, r in rows]
        assert sorted(seen) == sorted(set(seen)) and len(seen) == total


def test_resampled_masks_use_targets_at_all_positions(tiny_shards_all, tiny_shards, tmp_path):
    run_training(tcfg(tiny_shards_all, tmp_path / "rs", resample_masks=True, epochs=3, steps=None))
    r = runner.invoke(app, ["run", str(tiny_shards), "--out", str(tmp_path / "x"), "--resample-masks", "--no-progress"])
    assert r.exit_code == 2 and "--positions all" in r.output


def test_eval_prints_json_last_line_and_sample_runs(tiny_shards, tmp_path):
    run_training(tcfg(tiny_shards, tmp_path / "e"))
    r = runner.invoke(app, ["eval", str(tmp_path / "e"), "--data", str(tiny_shards), "--mask-draws", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.output.strip().splitlines()[-1])
    # the bound comes with its scale: log V, the score of a uniform guess
    assert res["uniform_nll"] == __import__("math").log(Manifest.load(tiny_shards).tokenizer.vocab_size)
    assert f"nll_bound {res['nll_bound']:.3f} ± " in r.output and f"log V = {res['uniform_nll']:.2f})" in r.output
    assert (
        res["nll_bound"] > 0
        and abs(res["ppl_bound"] - __import__("math").exp(res["nll_bound"])) < 1e-6 * res["ppl_bound"]
    )
    assert "kd_loss" in res and 0 <= res["masked_token_accuracy"] <= 1
    corpus = tmp_path / "held.txt"
    corpus.write_text("fair is foul and foul is fair, hover through the fog and filthy air. " * 3)
    r = runner.invoke(app, ["eval", str(tmp_path / "e"), "--data", str(corpus)])
    assert r.exit_code == 0 and "kd_loss" not in json.loads(r.output.strip().splitlines()[-1])
    r = runner.invoke(app, ["sample", str(tmp_path / "e"), "--prompt", "fair is", "--length", "6", "--steps", "3"])
    assert r.exit_code == 0 and len(r.output.strip("\n")) > 0
    r = runner.invoke(app, ["plot", str(tmp_path / "e")])
    assert r.exit_code == 0 and (tmp_path / "e" / "loss.png").stat().st_size > 1000


def test_bad_inputs(tiny_shards, tmp_path):
    def run(*args):
        r = runner.invoke(app, ["run", *map(str, args), "--no-progress"])
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        return r.output

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no manifest.json" in run(empty)
    assert "--lambda must be in [0, 1]" in run(tiny_shards, "--lambda", "1.5")
    assert "--temperature must be > 0" in run(tiny_shards, "--temperature", "0")
    bad = tmp_path / "s.json"
    bad.write_text(json.dumps({"vocab_size": 123, "hidden_size": 64}))
    assert "does not fit the shards' vocabulary" in run(tiny_shards, "--student", bad)
    bad.write_text(json.dumps({"hidden_size": 30, "num_heads": 4}))
    assert "must divide" in run(tiny_shards, "--student", bad)
    # another schema version
    other = tmp_path / "v2"
    shutil.copytree(tiny_shards, other)
    m = json.loads((other / "manifest.json").read_text())
    m["schema_version"] = 2
    (other / "manifest.json").write_text(json.dumps(m))
    assert "schema version 2" in run(other)
    # resume with another config, resume without a checkpoint, a checkpoint in the way
    run_training(tcfg(tiny_shards, tmp_path / "ck", steps=1))
    assert "another student config" in run(tiny_shards, "--out", tmp_path / "ck", "--resume", "--student", "small")
    assert "no checkpoint" in run(tiny_shards, "--out", tmp_path / "none", "--resume")
    assert "pass --resume" in run(tiny_shards, "--out", tmp_path / "ck", "--student", "tiny")
    # shards with another tokenizer than the checkpoint's
    m = json.loads((tiny_shards / "manifest.json").read_text())
    m["tokenizer"]["sha256"] = "0" * 64
    other_tok = tmp_path / "tok"
    shutil.copytree(tiny_shards, other_tok)
    (other_tok / "manifest.json").write_text(json.dumps(m))
    assert "another tokenizer" in run(other_tok, "--out", tmp_path / "ck", "--resume", "--student", "tiny")


def test_init_from_ar_checkpoint_is_the_ar_model_with_bidirectional_attention(tiny_shards, tiny_teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from ar2mdm.train.init import student_from_ar

    m = Manifest.load(tiny_shards)
    student = student_from_ar(
        str(tiny_teacher), m.tokenizer.vocab_size, m.tokenizer.sha256, m.seq_len, shift=False
    ).eval()
    ar = AutoModelForCausalLM.from_pretrained(tiny_teacher, attn_implementation="sdpa").eval()
    x = torch.randint(3, m.tokenizer.vocab_size, (2, 12))
    full = torch.ones(2, 1, 12, 12, dtype=torch.bool)  # every position sees every other: bidirectional
    with torch.no_grad():
        ref = ar(x, attention_mask=full).logits
        got = student(x)
        causal = ar(x).logits
    assert torch.allclose(got, ref, atol=1e-4)
    assert not torch.allclose(got, causal, atol=1e-2)
    run_training(tcfg(tiny_shards, tmp_path / "init", init_from=str(tiny_teacher), steps=2))


@pytest.mark.parametrize(
    "package, other",
    [
        ("train", "precompute"),
        ("precompute", "train"),
        ("shared", "precompute"),
        ("shared", "train"),
        ("schemas", "shared"),
        ("student", "shared"),
        ("student", "schemas"),
        ("student", "train"),
        ("student", "precompute"),
    ],
)
def test_the_layers_never_import_each_other_the_wrong_way(package, other):
    """student, schemas <- shared <- precompute | train: the two stages meet only through files, and what they
    share imports neither; the student imports nothing else of ar2mdm (tests/student/test_imports.py)."""
    for f in (REPO / package).glob("*.py"):
        tree = ast.parse(f.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.startswith(f"ar2mdm.{other}") for n in names), f"{package}/{f.name} imports {names}"


def test_training_runs_without_teacher_or_precompute(tiny_shards, tmp_path):
    """The trainer needs only the shard folder: the teacher folder is gone, and ar2mdm.precompute never loads."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    code = (
        "import sys; from ar2mdm.train.cli import app; "
        f"app(['run', {str(shards)!r}, '--out', {str(tmp_path / 'run')!r}, '--student', 'tiny', '--steps', '2', "
        "'--batch-size', '2', '--no-progress'], standalone_mode=False); "
        "from ar2mdm.train.config import EvalConfig; from ar2mdm.train.evaluate import evaluate; "
        f"evaluate(EvalConfig(run={str(tmp_path / 'run')!r}, data={str(shards)!r}, mask_draws=1)); "
        "assert not [m for m in sys.modules if m.startswith('ar2mdm.precompute')], 'precompute imported'; "
        "print('CLEAN')"
    )
    env = {**os.environ, "AR2MDM_CACHE": str(tmp_path / "empty_cache")}  # no converted teacher to find either
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert out.returncode == 0 and "CLEAN" in out.stdout, out.stderr[-2000:]


def test_ddp_two_cpu_processes_gloo(tiny_shards, tmp_path):
    r = _torchrun(tiny_shards, tmp_path / "ddp", 29533, steps=3)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["steps"] == 3 and (tmp_path / "ddp" / "checkpoint" / "model.safetensors").exists()


def _torchrun(tiny_shards, out, port, *extra, steps=4):
    """`kdtrain run` under torchrun, two CPU processes (gloo); fails the test unless it exits 0."""
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        "2",
        "--master_port",
        str(port),
        "-m",
        "ar2mdm.train.cli",
        "run",
        str(tiny_shards),
        "--out",
        str(out),
        "--student",
        "tiny",
        "--steps",
        str(steps),
        "--batch-size",
        "2",
        "--no-progress",
        *extra,
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def test_fsdp_two_cpu_processes_checkpoint_and_resume(tiny_shards, tmp_path):
    """FSDP2 under torchrun (gloo): the checkpoint holds full weights, and a resumed run matches a straight one."""
    _torchrun(tiny_shards, tmp_path / "straight", 29561, "--fsdp")
    _torchrun(tiny_shards, tmp_path / "resumed", 29562, "--fsdp", "--stop-at", "2")
    _torchrun(tiny_shards, tmp_path / "resumed", 29563, "--fsdp", "--resume")
    wa, wb = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert wa["model.embed_tokens.weight"].shape[1] == 128  # unsharded
    for k in wa:
        assert torch.allclose(wa[k], wb[k], atol=1e-6), k


def test_batch_tokens_sets_the_gradient_accumulation_and_trains_as_it_would(tiny_shards, tmp_path):
    """--batch-tokens N: --grad-accum = N / (batch-size x L x ranks), rounded up; the run is the one that
    --grad-accum itself gives (same weights), and giving both is refused in one line."""
    from ar2mdm.shared.errors import UserError
    from ar2mdm.train.data import load_shard_manifest

    L = load_shard_manifest(tiny_shards).seq_len
    run_training(tcfg(tiny_shards, tmp_path / "tok", batch_tokens=3 * 4 * L + 1, steps=2))  # 3.x micro-batches
    run_training(tcfg(tiny_shards, tmp_path / "acc", grad_accum=4, steps=2))
    wa, wb = weights(tmp_path / "tok"), weights(tmp_path / "acc")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    with pytest.raises(UserError, match="give one of them"):
        run_training(tcfg(tiny_shards, tmp_path / "both", batch_tokens=1000, grad_accum=2))


def test_compiled_student_trains_as_the_eager_one_without_recompiling_each_step(tiny_shards, tmp_path):
    """--compile (the CUDA default; here inductor's CPU code): the same weights as eager up to float rounding, and
    the masked positions' count, which changes every batch, costs one more graph (dynamic), not one per step."""
    from torch._dynamo.utils import counters

    run_training(tcfg(tiny_shards, tmp_path / "eager", steps=6, save_every=100))
    counters.clear()
    run_training(tcfg(tiny_shards, tmp_path / "compiled", steps=6, save_every=100, compile=True))
    assert 1 <= counters["stats"]["unique_graphs"] <= 2, dict(counters["stats"])  # compiled, and not per step
    wa, wb = weights(tmp_path / "eager"), weights(tmp_path / "compiled")
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-4


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("tail,schedule", [("renormalize", "constant"), ("bucket", "linear-decay")])
def test_a_step_waits_for_the_device_only_where_it_must(tiny_shards, tmp_path, tail, schedule, device):
    """The forward, both losses and the backward read no device value and make no data-dependent shape
    (tests/syncs.py), but for the one the bucket tail documents (`rest_logmass`: does any position need the
    summed route). The step's own read, loss parts and gradient norm together, is a copy the CPU cannot see."""
    from ar2mdm.train.device import autocast_for
    from ar2mdm.train.loop import setup_training
    from ar2mdm.train.objective import step_losses
    from tests.syncs import HostSyncs

    cfg = tcfg(tiny_shards, tmp_path / "r", tail=tail, lambda_schedule=schedule, device=device, compile=False)
    tr = setup_training(cfg)
    batch = next(tr.batches).to(tr.device)
    with HostSyncs() as syncs, autocast_for(tr.device, "auto"):
        loss, _ = step_losses(
            tr.train_model, batch, tr.objective, tr.spec, mask_id=tr.model.config.mask_id, progress=0.3
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), tr.cfg.clip)
    expected = {("_local_scalar_dense", "losses.py")} if tail == "bucket" else set()
    assert {(op, at.split(":")[0]) for op, at in syncs.where} == expected and syncs.count == len(expected), dict(
        syncs.where
    )
