import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.cli import app
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.shared.shards import read_shard
from ar2mdm.shared.validate import ValidationError, summarize_dir, validate_dir
from tests.tiny import TEXT

runner = CliRunner()


def cfg(corpus, teacher, out, **kw) -> BuildConfig:
    base = dict(
        corpus=str(corpus),
        teacher=str(teacher),
        out=str(out),
        seq_len=24,
        k=3,
        window=4,
        top_n=5,
        seqs_per_shard=2,
        progress=False,
    )
    base.update(kw)
    return BuildConfig(**base)


def _cli(*args):
    r = runner.invoke(app, ["build", *map(str, args), "--no-progress"])
    assert "Traceback" not in r.output
    return r


def _cli_as_cfg(corpus, teacher, out, *extra):
    """`kdtargets build` with the settings `cfg` gives, as the command line spells them."""
    settings = ("--seq-len", 24, "--k", 3, "--window", 4, "--top-n", 5, "--seqs-per-shard", 2)
    return _cli(corpus, "--teacher", teacher, "--out", out, *settings, *extra)


def shard_hashes(d: Path) -> dict[str, str]:
    m = json.loads((d / "manifest.json").read_text())
    return {s["file"]: s["sha256"] for s in m["shards"]}


def test_build_validate_inspect_and_rerun(tiny_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    s = run_build(cfg(tiny_corpus, tiny_teacher, out, masks_per_seq=2))
    assert s.shards_written >= 2 and s.rows > 0
    m = validate_dir(out)
    data = read_shard(out / m.shards[0].file)
    assert data.example_ids[0].endswith("-m0") and data.example_ids[1].endswith("-m1")
    assert (data.input_ids[:, 0] == 1).all()  # BOS
    np.testing.assert_array_equal(data.mask_positions, data.target_positions)  # --positions masked
    summary = summarize_dir(out)
    assert summary["rows"] == s.rows and 0 < summary["mean_true_token_prob"] <= 1
    assert summary["bytes_per_target_position"] > 0
    before = shard_hashes(out)
    again = run_build(cfg(tiny_corpus, tiny_teacher, out, masks_per_seq=2))
    assert again.shards_written == 0 and again.shards_skipped == s.shards_written
    assert shard_hashes(out) == before


def test_positions_all_and_safetensors(tiny_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "st"
    run_build(cfg(tiny_corpus, tiny_teacher, out, positions="all", format="safetensors", max_sequences=3))
    m = validate_dir(out)
    assert m.targets_at_all_positions and m.format == "safetensors"
    data = read_shard(out / m.shards[0].file)
    assert data.target_offsets[1] == 23  # positions 1..23 of a 24-token row
    # the same build as Parquet holds the same rows and targets
    out2 = tmp_path / "pq"
    run_build(cfg(tiny_corpus, tiny_teacher, out2, positions="all", max_sequences=3))
    d2 = read_shard(out2 / validate_dir(out2).shards[0].file)
    np.testing.assert_array_equal(d2.target_ids, data.target_ids)
    np.testing.assert_array_equal(d2.target_logprobs, data.target_logprobs)


def test_ranks_split_documents_and_share_one_manifest(tiny_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "ranks"
    for r in range(2):
        run_build(cfg(tiny_corpus, tiny_teacher, out, by_line=False, rank=r, world_size=2))
    m = validate_dir(out)
    files = [s.file for s in m.shards]
    assert any(f.startswith("part-00000-") for f in files) and any(f.startswith("part-00001-") for f in files)
    r = _cli_as_cfg(tiny_corpus, tiny_teacher, out)
    assert r.exit_code == 2 and "world_size: 2 there, 1 now" in r.output


def test_other_parameters_into_same_out_are_refused(tiny_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "o"
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=1))
    args = [
        "build",
        str(tiny_corpus),
        "--teacher",
        str(tiny_teacher),
        "--out",
        str(out),
        "--seq-len",
        "24",
        "--k",
        "4",
        "--window",
        "4",
        "--top-n",
        "5",
        "--seqs-per-shard",
        "2",
        "--max-sequences",
        "1",
        "--no-progress",
    ]
    r = runner.invoke(app, args)
    assert r.exit_code == 2
    assert "params.k: 3 there, 4 now" in r.output and "Traceback" not in r.output


def test_a_build_that_recorded_its_corpus_by_content_resumes_and_another_corpus_is_refused(
    tiny_corpus, tiny_teacher, tmp_path
):
    """Builds before the per-rank corpus digests recorded the fingerprint over names and contents; rerunning
    them must resume their shards (the quickstart's own folder did not), and still refuse a changed corpus."""
    from ar2mdm.shared.corpus import corpus_fingerprint, files_sha256, list_corpus_files

    out = tmp_path / "old"
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=4))
    before = shard_hashes(out)
    files = list_corpus_files(tiny_corpus)
    m = json.loads((out / "manifest.json").read_text())
    m["corpus"]["fingerprint"] = files_sha256(files, tiny_corpus)  # a manifest that records the contents' digest
    (out / "manifest.json").write_text(json.dumps(m))
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=4))
    assert shard_hashes(out) == before
    assert json.loads((out / "manifest.json").read_text())["corpus"]["fingerprint"] == corpus_fingerprint(
        files, tiny_corpus
    )
    # a content digest of other text, names and sizes unchanged: still another corpus
    m["corpus"]["fingerprint"] = files_sha256(files, tiny_corpus)
    (out / "manifest.json").write_text(json.dumps(m))
    first = files[0]
    first.write_text(first.read_text()[::-1])
    r = _cli_as_cfg(tiny_corpus, tiny_teacher, out, "--max-sequences", 4)
    assert r.exit_code == 2 and "corpus.fingerprint" in r.output  # (and no traceback: _cli)


def test_validate_catches_tampering(tiny_corpus, tiny_teacher, tmp_path):
    out = tmp_path / "v"
    run_build(cfg(tiny_corpus, tiny_teacher, out, max_sequences=2))
    m = validate_dir(out)
    shard = out / m.shards[0].file
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(ValidationError, match="sha256"):
        validate_dir(out)
    r = runner.invoke(app, ["validate", str(out)])
    assert r.exit_code == 1 and "sha256" in r.output


def _build_cmd(corpus, teacher, out, *extra, seqs_per_shard=1):
    """`kdtargets build` as a process (for signals); also tests/precompute/test_build_recovery.py's."""
    return [
        sys.executable,
        "-m",
        "ar2mdm.precompute.cli",
        "build",
        str(corpus),
        "--teacher",
        str(teacher),
        "--out",
        str(out),
        "--seq-len",
        "24",
        "--k",
        "3",
        "--top-n",
        "5",
        "--seqs-per-shard",
        str(seqs_per_shard),
        "--masks-per-seq",
        "2",
        "--no-progress",
        *extra,
    ]


def test_killed_build_resumes_to_identical_shards(tmp_path, tiny_teacher):
    corpus = tmp_path / "c"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 6)
    ref = tmp_path / "ref"
    subprocess.run(_build_cmd(corpus, tiny_teacher, ref), check=True, capture_output=True)
    total = len(shard_hashes(ref))
    assert total >= 8
    out = tmp_path / "killed"
    proc = subprocess.Popen(_build_cmd(corpus, tiny_teacher, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.done"))) < 2:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done = len(list(out.glob("*.done")))
    assert 0 < done < total, f"kill came too late or too early ({done}/{total})"
    subprocess.run(_build_cmd(corpus, tiny_teacher, out), check=True, capture_output=True)
    assert shard_hashes(out) == shard_hashes(ref)
    for name in shard_hashes(ref):
        assert (out / name).read_bytes() == (ref / name).read_bytes()
    assert not list(out.glob("*.tmp*"))


# ------------------------------------------------------------------------------------------ bad input


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_teacher, tiny_corpus):
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli(empty, "--teacher", tiny_teacher, "--out", tmp_path / "o1")
    assert r.exit_code == 2 and "holds no" in r.output

    only_bad = tmp_path / "bad"
    only_bad.mkdir()
    (only_bad / "x.txt").write_bytes(b"\x00\x00binary")
    (only_bad / "y.txt").write_text("")
    r = _cli(only_bad, "--teacher", tiny_teacher, "--out", tmp_path / "o2")
    assert r.exit_code == 2 and "no usable documents" in r.output

    short = tmp_path / "short"
    short.mkdir()
    (short / "a.txt").write_text("tiny")
    r = _cli(short, "--teacher", tiny_teacher, "--out", tmp_path / "o3", "--seq-len", "64")
    assert r.exit_code == 2 and "no full row of --seq-len 64" in r.output

    r = _cli(tiny_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "o4", "--k", "1000")
    assert r.exit_code == 2 and "larger than the teacher's vocabulary" in r.output

    r = _cli(tiny_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "o5", "--seq-len", "4096")
    assert r.exit_code == 2 and "larger than the teacher's context (256" in r.output

    broken = tmp_path / "broken_teacher"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"junk")
    r = _cli(tiny_corpus, "--teacher", broken, "--out", tmp_path / "o6")
    assert r.exit_code == 2 and "does not load" in r.output

    sft = tmp_path / "sft.jsonl"
    sft.write_text('{"prompt": "hello"}\n')
    r = _cli(sft, "--teacher", tiny_teacher, "--out", tmp_path / "o7", "--task", "sft")
    assert r.exit_code == 2 and "without a response" in r.output and "no usable documents" in r.output


def test_sft_build_masks_only_the_response(tmp_path, tiny_teacher):
    f = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"question {j}: where is the heath?", "response": "upon the heath, my lord."} for j in range(4)]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "o"
    run_build(cfg(f, tiny_teacher, out, task="sft", seq_len=64, positions="all"))
    m = validate_dir(out)
    data = read_shard(out / m.shards[0].file)
    for r in range(data.rows):
        pl = int(data.prompt_len[r])
        assert pl > 1
        assert data.row_masks(r).min() >= pl
        assert data.target_positions[data.target_offsets[r]] == pl


@pytest.mark.parametrize(
    "score,weights", [("next-token", "importance"), ("full-conditional", "uniform"), ("full-conditional", "smc")]
)
def test_mc_build_is_reproducible_and_resumes_identically(tiny_corpus, tiny_teacher, tmp_path, score, weights):
    kw = dict(
        mode="mc", k=4, mc_score=score, mc_weights=weights, rescore_k=3, max_sequences=4, masks_per_seq=2, smc_ess=1.0
    )  # smc: resample at every visible run
    a, b = tmp_path / "a", tmp_path / "b"
    run_build(cfg(tiny_corpus, tiny_teacher, a, **kw))
    m = validate_dir(a)
    assert m.mask_dependent_targets and m.mode == "mc"
    data = read_shard(a / m.shards[0].file)
    assert (data.mc_samples == 4).all() and ((data.mc_ess >= 1) & (data.mc_ess <= 4 + 1e-4)).all()
    if weights == "uniform":
        np.testing.assert_allclose(data.mc_ess, 4, rtol=1e-5)
    np.testing.assert_array_equal(data.mask_positions, data.target_positions)
    # a second build, interrupted after its first shard (marker and later shards removed), then resumed
    run_build(cfg(tiny_corpus, tiny_teacher, b, **kw))
    for f in sorted(b.glob("part-*.parquet"))[1:]:
        f.unlink()
        (b / (f.name + ".done")).unlink()
    again = run_build(cfg(tiny_corpus, tiny_teacher, b, **kw))
    assert again.shards_skipped == 1 and again.shards_written == len(m.shards) - 1
    assert shard_hashes(a) == shard_hashes(b)
    summary = summarize_dir(a)
    assert "mean_mc_ess" in summary
    if weights == "smc":  # every row with a visible run between masked positions resampled there
        assert (data.mc_resamples > 0).sum() >= data.rows // 2
        assert summary["mean_mc_resamples_per_row"] >= 1
        assert 1 <= summary["mean_mc_ess_before_resampling"] < 4
        assert m.params["smc_ess"] == 1.0
    else:
        assert (data.mc_resamples == 0).all() and "mean_mc_ess_before_resampling" not in summary


def test_mc_targets_do_not_depend_on_the_batch_size(tiny_corpus, tiny_teacher, tmp_path):
    """A row's draws are a function of (seed, row, position, particle), so --batch-size 1 and 7 agree."""
    kw = dict(mode="mc", k=4, max_sequences=7, seqs_per_shard=7, smc_ess=1.0, logprob_dtype="float32")
    one, seven = tmp_path / "b1", tmp_path / "b7"
    run_build(cfg(tiny_corpus, tiny_teacher, one, batch_size=1, **kw))
    run_build(cfg(tiny_corpus, tiny_teacher, seven, batch_size=7, **kw))
    a = read_shard(one / validate_dir(one).shards[0].file)
    b = read_shard(seven / validate_dir(seven).shards[0].file)
    assert a.rows == b.rows == 7 and (a.mc_resamples > 0).any()
    np.testing.assert_array_equal(a.entry_offsets, b.entry_offsets)
    np.testing.assert_array_equal(a.target_ids, b.target_ids)
    np.testing.assert_allclose(a.target_logprobs, b.target_logprobs, atol=1e-5)
    np.testing.assert_allclose(a.mc_ess, b.mc_ess, rtol=1e-5)


def test_vllm_backend_missing_is_a_clear_error(tmp_path, tiny_teacher, tiny_corpus, monkeypatch):
    import ar2mdm.precompute.vllm_backend as vb

    monkeypatch.setattr(vb, "vllm_available", lambda: False)
    r = _cli(tiny_corpus, "--teacher", tiny_teacher, "--out", tmp_path / "o", "--backend", "vllm")
    assert r.exit_code == 2 and "vLLM is not installed" in r.output
    assert not (tmp_path / "o").exists()
    # auto falls back to the torch backend
    r = _cli(
        tiny_corpus,
        "--teacher",
        tiny_teacher,
        "--out",
        tmp_path / "auto",
        "--backend",
        "auto",
        "--max-sequences",
        "1",
        "--seq-len",
        "24",
    )
    assert r.exit_code == 0, r.output
    # and so it does on a machine without a GPU even where vLLM imports (torch measured faster there)
    import torch

    monkeypatch.setattr(vb, "vllm_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    r = _cli(
        tiny_corpus,
        "--teacher",
        tiny_teacher,
        "--out",
        tmp_path / "auto2",
        "--backend",
        "auto",
        "--max-sequences",
        "1",
        "--seq-len",
        "24",
    )
    assert r.exit_code == 0 and "(hf backend)" in r.output, r.output


# ------------------------------------------------------------------------------------------ the shard writer


def test_the_writer_overlaps_the_next_shard_and_lands_shards_in_order(tiny_corpus, tiny_teacher, tmp_path, monkeypatch):
    """A shard is written while the teacher computes the next one: the writer of shard 0 waits for the next
    shard's first teacher call, which could never come if writing blocked the loop. The output is the bytes of
    a build whose writer never waited."""
    import threading

    from ar2mdm.precompute import build as build_mod
    from ar2mdm.precompute import outdir

    ref = tmp_path / "ref"
    run_build(cfg(tiny_corpus, tiny_teacher, ref))
    real_rows, real_write = build_mod.build_rows, outdir.write_shard
    calls, started = [], threading.Event()

    def build_rows(*a, **kw):
        calls.append(1)
        if len(calls) == 2:  # shard 1's first batch (one batch per shard of 2 sequences)
            started.set()
        return real_rows(*a, **kw)

    overlapped = []

    def write_shard(data, path, *a):
        if not overlapped:
            overlapped.append(started.wait(timeout=60))
        return real_write(data, path, *a)

    monkeypatch.setattr(build_mod, "build_rows", build_rows)
    monkeypatch.setattr(outdir, "write_shard", write_shard)
    out = tmp_path / "o"
    s = run_build(cfg(tiny_corpus, tiny_teacher, out))
    assert overlapped == [True]
    assert s.shards_written == len(shard_hashes(ref)) >= 2
    assert shard_hashes(out) == shard_hashes(ref)
    assert (out / "manifest.json").read_bytes() == (ref / "manifest.json").read_bytes()


def test_a_failing_writer_stops_the_build_keeps_the_finished_shards_and_the_rerun_completes(
    tiny_corpus, tiny_teacher, tmp_path, monkeypatch
):
    from ar2mdm.precompute import outdir

    ref = tmp_path / "ref"
    run_build(cfg(tiny_corpus, tiny_teacher, ref))
    real, n = outdir.write_shard, []

    def full_disk_at_the_second_shard(data, path, *a):
        n.append(1)
        if len(n) == 2:
            raise OSError(28, "No space left on device")
        return real(data, path, *a)

    monkeypatch.setattr(outdir, "write_shard", full_disk_at_the_second_shard)
    out = tmp_path / "o"
    with pytest.raises(OSError, match="No space left"):
        run_build(cfg(tiny_corpus, tiny_teacher, out))
    assert list(shard_hashes(out)) == list(shard_hashes(ref))[:1]  # the first shard is finished and listed
    monkeypatch.setattr(outdir, "write_shard", real)
    run_build(cfg(tiny_corpus, tiny_teacher, out))
    assert shard_hashes(out) == shard_hashes(ref)
