"""Multi-rank builds: a world is finished only when every rank is, and says which ranks are missing."""

import json
import random
from pathlib import Path

import pytest
from typer.testing import CliRunner

import ar2mdm.precompute.build as build_mod
from ar2mdm.precompute.build import Interrupted, run_build
from ar2mdm.precompute.cli import app as kdtargets
from ar2mdm.precompute.config import launcher_rank
from ar2mdm.shared.shards import read_shard
from ar2mdm.shared.validate import summarize_dir, validate_dir
from ar2mdm.train.cli import app as kdtrain
from tests.precompute.test_build import _cli, cfg, shard_hashes
from tests.tiny import CHARS

runner = CliRunner()
SEQ = 24  # a document of SEQ - 2 characters + EOS is exactly one row after BOS: no row spans two documents


@pytest.fixture()
def whole_row_docs(tmp_path) -> Path:
    """Nine files of one row-sized document each, so that any split of them over ranks packs the same rows."""
    d = tmp_path / "docs"
    d.mkdir()
    rng = random.Random(0)
    letters = [c for c in CHARS if c != "\n"]
    for j in range(9):
        (d / f"doc{j}.txt").write_text("".join(rng.choice(letters) for _ in range(SEQ - 2)))
    return d


def world(corpus, teacher, out, rank, **kw):
    return run_build(cfg(corpus, teacher, out, seq_len=SEQ, seqs_per_shard=1, rank=rank, world_size=3, **kw))


def rows_of(out: Path) -> list[bytes]:
    m = json.loads((out / "manifest.json").read_text())
    return sorted(r.tobytes() for s in m["shards"] for r in read_shard(out / s["file"]).input_ids)


def test_a_partial_world_is_named_refused_by_the_trainer_and_completed_by_the_rerun(
    whole_row_docs, tiny_teacher, tmp_path, monkeypatch
):
    ref = tmp_path / "ref"
    for r in range(3):
        world(whole_row_docs, tiny_teacher, ref, r)
    validate_dir(ref)
    assert summarize_dir(ref)["status"] == "finished" and summarize_dir(ref)["ranks"] == "3 of 3 finished"
    # the union of the ranks' rows is the single-rank build's
    single = tmp_path / "single"
    run_build(cfg(whole_row_docs, tiny_teacher, single, seq_len=SEQ))
    assert rows_of(ref) == rows_of(single) and len(rows_of(single)) == 9

    out = tmp_path / "w"
    world(whole_row_docs, tiny_teacher, out, 0)
    real, calls = build_mod.build_rows, []

    def dies_at_the_second_shard(*a, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **kw)

    monkeypatch.setattr(build_mod, "build_rows", dies_at_the_second_shard)
    with pytest.raises(Interrupted):
        world(whole_row_docs, tiny_teacher, out, 1)
    monkeypatch.setattr(build_mod, "build_rows", real)
    expected = "1 of 3 finished (rank 1 in progress or stopped: 1 shards so far; rank 2 never started)"
    s = summarize_dir(out)
    assert s["ranks"] == expected and s["status"].startswith("unfinished")
    r = runner.invoke(kdtargets, ["inspect", str(out)])
    assert r.exit_code == 0 and f"ranks: {expected}" in r.output
    r = runner.invoke(kdtargets, ["validate", str(out)])
    assert r.exit_code == 1 and expected in r.output
    world(whole_row_docs, tiny_teacher, out, 2)
    expected = "2 of 3 finished (rank 1 in progress or stopped: 1 shards so far)"

    # the trainer stops with one line naming the missing rank, unless --allow-partial
    train = ["run", str(out), "--student", "tiny", "--steps", "1", "--batch-size", "2", "--no-progress"]
    r = runner.invoke(kdtrain, [*train, "--out", str(tmp_path / "run")])
    assert r.exit_code == 2 and expected in r.output and len(r.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()
    r = runner.invoke(kdtrain, [*train, "--out", str(tmp_path / "run"), "--allow-partial"])
    assert r.exit_code == 0, r.output
    assert f"{expected}; 7 rows in 7 finished shards so far" in r.output and "--allow-partial" in r.output

    # the interrupted rank's rerun completes the world: the same bytes as the uninterrupted one
    world(whole_row_docs, tiny_teacher, out, 1)
    assert summarize_dir(out)["status"] == "finished"
    validate_dir(out)
    assert shard_hashes(out) == shard_hashes(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_a_rank_with_nothing_to_do_finishes_with_no_shard(tiny_teacher, tmp_path):
    corpus = tmp_path / "one.txt"
    corpus.write_text("fair is foul, and foul is fair: hover through the fog and filthy air.\n")
    out = tmp_path / "o"
    base = [corpus, "--teacher", tiny_teacher, "--out", out, "--seq-len", 24, "--k", 3, "--top-n", 5, "--world-size", 2]
    r = _cli(*base, "--rank", 1)  # one document: rank 1 has none
    assert r.exit_code == 0, r.output
    assert "rank 1 of 2 has nothing to do (corpus" in r.output and "finished with 0 shards" in r.output
    assert summarize_dir(out)["ranks"] == "1 of 2 finished (rank 0 never started)"
    r = _cli(*base, "--rank", 0)
    assert r.exit_code == 0, r.output
    m = validate_dir(out)
    assert [(x.rank, x.shards, x.rows) for x in m.ranks] == [(0, 1, m.shards[0].rows), (1, 0, 0)]
    # a lone rank with nothing to do is still bad input
    (tmp_path / "empty.txt").write_text("")
    r = _cli(tmp_path / "empty.txt", "--teacher", tiny_teacher, "--out", tmp_path / "e")
    assert r.exit_code == 2 and "no usable documents" in r.output


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, None),
        ({"RANK": "3", "WORLD_SIZE": "8"}, (3, 8)),
        ({"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "64", "SLURM_ARRAY_TASK_MIN": "0"}, (5, 64)),
        ({"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1"}, (0, 4)),
        ({"SLURM_STEP_ID": "0", "SLURM_PROCID": "2", "SLURM_NTASKS": "4"}, (2, 4)),
        ({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}, None),  # a batch script, not a step: one process
        (
            {
                "SLURM_ARRAY_TASK_ID": "2",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "0",
                "SLURM_STEP_ID": "0",
                "SLURM_PROCID": "1",
                "SLURM_NTASKS": "2",
            },
            (5, 6),
        ),
    ],
)
def test_rank_and_world_size_come_from_the_launcher(env, expected):
    got = launcher_rank(env)
    assert (got[:2] if got else None) == expected


def test_the_launchers_rank_is_printed_and_explicit_flags_win(tiny_teacher, tiny_corpus, tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "0")
    base = [tiny_corpus, "--teacher", tiny_teacher, "--seq-len", 24, "--k", 3, "--top-n", 5, "--max-sequences", 1]
    r = _cli(*base, "--out", tmp_path / "a")
    assert r.exit_code == 0, r.output
    assert "rank 1 of 2 (from SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT)" in r.output
    assert json.loads((tmp_path / "a" / "manifest.json").read_text())["world_size"] == 2
    assert list((tmp_path / "a").glob("part-00001-*.parquet")) and not list((tmp_path / "a").glob("part-00000-*"))
    r = _cli(*base, "--out", tmp_path / "b", "--rank", 0, "--world-size", 1)
    assert r.exit_code == 0 and "from SLURM" not in r.output
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")  # an array with a step: its ids are not 0..count-1
    r = _cli(*base, "--out", tmp_path / "c")
    assert r.exit_code == 2 and "pass --rank and --world-size" in r.output


def test_a_second_build_of_the_same_rank_into_the_same_out_is_refused(tiny_corpus, tiny_teacher, tmp_path):
    import os

    from ar2mdm.precompute.outdir import rank_lock
    from ar2mdm.shared.errors import UserError

    out = tmp_path / "o"
    out.mkdir()
    with rank_lock(out, 0):  # a build of rank 0 in progress (this process stands in for it)
        with pytest.raises(UserError, match=f"rank 0 is being built there by pid {os.getpid()} on "):
            run_build(cfg(tiny_corpus, tiny_teacher, out, rank=0, world_size=2))
        assert not list(out.glob("part-*"))  # refused before any work
        run_build(cfg(tiny_corpus, tiny_teacher, out, rank=1, world_size=2))  # other ranks share the folder
    run_build(cfg(tiny_corpus, tiny_teacher, out, rank=0, world_size=2))  # released: the rank builds
    assert summarize_dir(out)["status"] == "finished"


def test_a_build_of_an_earlier_version_without_rank_records_reads_as_finished(tiny_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "old"
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=2))
    m = json.loads((out / "manifest.json").read_text())
    del m["ranks"], m["sft_format"]  # as ar2mdm wrote it before these fields
    (out / "manifest.json").write_text(json.dumps(m))
    (out / "rank-00000.done").unlink()
    s = summarize_dir(out)
    assert s["status"] == "finished" and s["ranks"].startswith("1 (completion not recorded")
    validate_dir(out)
    r = runner.invoke(
        kdtrain,
        [
            "run",
            str(out),
            "--out",
            str(tmp_path / "r"),
            "--student",
            "tiny",
            "--steps",
            "1",
            "--batch-size",
            "2",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    again = run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=2))  # the rerun records the rank
    assert again.shards_written == 0 and summarize_dir(out)["ranks"] == "1 of 1 finished"
