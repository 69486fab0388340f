"""Failed, stopped and changed builds: a failure blocks nothing, Ctrl-C keeps and says what it kept, changed
plans are named and can be started afresh, inspect/validate tell the state of a folder, the progress bar."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.precompute.build import run_build, size_threads
from ar2mdm.precompute.cli import app
from ar2mdm.shared.errors import UserError
from tests.precompute.test_build import _build_cmd, cfg
from tests.tiny import TEXT

runner = CliRunner()


def test_a_build_that_fails_before_its_first_shard_blocks_nothing(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "o"
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "a.txt").write_text("")
    with pytest.raises(UserError, match="no usable documents"):
        run_build(cfg(empty, tiny_teacher, out))
    assert not (out / "manifest.json").exists()  # the corpus is read before the folder is touched
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=2))  # the fixed corpus builds
    # an unfinished plan with no finished shard (a stub left by an old version, or a crash) is replaced
    stub = tmp_path / "stub"
    run_build(cfg(tiny_corpus, tiny_teacher, stub, max_sequences=2))
    for p in stub.glob("part-*"):
        p.unlink()
    s = run_build(cfg(tiny_corpus, tiny_teacher, stub, max_sequences=4, k=2))
    assert s.shards_written == 2


def _cmd(corpus, teacher, out, *extra):
    return _build_cmd(corpus, teacher, out, "--batch-size", "1", *extra, seqs_per_shard=64)


def test_ctrl_c_keeps_the_finished_sequences_says_so_and_resumes_to_the_same_shard(tmp_path, tiny_teacher):
    """One shard of 64 sequences that never finishes: Ctrl-C keeps what is done, and the rerun completes it
    to the same bytes as an uninterrupted build."""
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ref = tmp_path / "ref"
    subprocess.run(_cmd(corpus, tiny_teacher, ref), check=True, capture_output=True, env=env)
    out = tmp_path / "int"
    # SIGINT at its default in the child: a shell that started the tests in the background ignores it, and Python
    # then never turns it into KeyboardInterrupt (seen when CI ran under `bash -c "... &"`)
    proc = subprocess.Popen(
        _cmd(corpus, tiny_teacher, out, "--flush-seconds", "0"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob("*.partial")):
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted: ") and "sequences of part-00000-00000.parquet" in last and "rerun" in last
    assert "Traceback" not in err
    kept = list(out.glob("*.partial"))
    assert kept and not list(out.glob("*.done"))
    # inspect says the build is unfinished rather than printing zeros as if it were done
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "unfinished" in r.output
    r = subprocess.run(_cmd(corpus, tiny_teacher, out), capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    assert "resumed " in r.stdout and "redone" not in r.stderr  # the kept sequences were used, not recomputed
    name = "part-00000-00000.parquet"
    assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert not list(out.glob("*.partial"))


def test_a_changed_plan_names_what_changed_first_and_fresh_starts_over(tmp_path, tiny_teacher, tiny_corpus):
    out = tmp_path / "o"
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=2))
    args = [
        "build",
        str(tiny_corpus),
        "--teacher",
        str(tiny_teacher),
        "--out",
        str(out),
        "--mode",
        "mc",
        "--k",
        "8",
        "--seq-len",
        "32",
        "--no-progress",
        "--max-sequences",
        "1",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    for field in ('mode: "topk" there, "mc" now', "seq_len: 24 there, 32 now", "params.k: 3 there, 8 now", "--fresh"):
        assert field in r.output, r.output
    r = runner.invoke(app, args + ["--fresh"])
    assert r.exit_code == 0, r.output
    assert json.loads((out / "manifest.json").read_text())["mode"] == "mc"


def test_validate_and_inspect_say_a_missing_folder_does_not_exist(tmp_path):
    for cmd in ("validate", "inspect"):
        r = runner.invoke(app, [cmd, str(tmp_path / "nope")])
        assert r.exit_code in (1, 2) and "does not exist" in r.output and "Traceback" not in r.output


def test_backend_help_lists_every_backend_and_every_option_has_help():
    import typer.main

    cmd = typer.main.get_command(app)
    for name, sub in cmd.commands.items():
        for p in sub.params:
            assert getattr(p, "help", None), f"kdtargets {name} {p.name} has no help text"
    r = runner.invoke(app, ["build", "--help"], env={"COLUMNS": "200"})
    assert "vllm" in r.output


def test_sft_skip_warning_names_the_expected_and_the_found_fields(tmp_path, tiny_teacher):
    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "hello", "answer": "hi"}\n')
    r = runner.invoke(
        app,
        [
            "build",
            str(sft),
            "--teacher",
            str(tiny_teacher),
            "--out",
            str(tmp_path / "o"),
            "--task",
            "sft",
            "--no-progress",
        ],
    )
    assert r.exit_code == 2
    assert "'response'" in r.output and "fields found: answer, prompt" in r.output


def test_threads_are_shared_among_the_ranks_of_a_node():
    code = "from ar2mdm.precompute.build import size_threads; print(size_threads(None))"
    cores = len(os.sched_getaffinity(0))
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    one = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**env, "LOCAL_WORLD_SIZE": "2"}
    )
    assert int(one.stdout.strip()) == max(1, cores // 2)
    assert size_threads(torch.get_num_threads()) == torch.get_num_threads()  # an explicit --threads wins


@pytest.mark.parametrize("mode", ["topk", "mc"])
def test_the_progress_bar_counts_the_positions_the_teacher_scores(tmp_path, tiny_teacher, mode):
    """The bar advances within a teacher call as positions are scored (steady across rows of very different mask
    counts): the positions it is told of must be what the plan says the teacher scores."""
    import numpy as np

    from ar2mdm.precompute.targets import build_rows, target_plan
    from ar2mdm.precompute.teacher import TorchTeacher
    from ar2mdm.shared.hfmodel import resolve_model

    c = cfg(tmp_path, tiny_teacher, tmp_path / "o", mode=mode, masks_per_seq=2, k=2, batch_size=8, token_budget=4096)
    teacher = TorchTeacher.load(resolve_model(str(tiny_teacher))[0], "cpu")
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 30, size=(3, 24)).astype(np.int32)
    ids[:, 0] = 1
    plan = target_plan(c, ids, np.zeros(3, np.int32), np.arange(3))
    seen = []
    build_rows(c, teacher, plan, None, seen.append)
    assert sum(seen) == plan.scored > 0
    halves = [plan.sequences(0, 2), plan.sequences(2, 3)]  # a shard's plan, cut into teacher calls
    assert [r for h in halves for r in h.example_ids] == plan.example_ids
    assert sum(h.scored for h in halves) == plan.scored


def test_the_bar_counts_the_whole_builds_rows(tmp_path, tiny_teacher, tiny_corpus, capfd):
    """One bar for the whole build, in rows: its total is every row of every shard, never one shard's."""
    import re

    run_build(cfg(tiny_corpus, tiny_teacher, tmp_path / "o", seqs_per_shard=2, max_sequences=6, progress=True))
    err = capfd.readouterr().err
    totals = set(re.findall(r"/(\S+) rows", err))
    assert totals <= {"?", "6"} and "6.0/6 rows" in err, err[-500:]  # never a shard's total
