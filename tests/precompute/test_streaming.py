"""The corpus streams (shards are written before the corpus is read to its end), a rank with enough
files reads only its own, and the corpus contents a rank read are checked on a rerun."""

import threading
from pathlib import Path

import pytest

import ar2mdm.shared.corpus as corpus_mod
from ar2mdm.precompute.build import run_build
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.validate import ValidationError, validate_dir
from tests.precompute.test_build import cfg, shard_hashes
from tests.tiny import TEXT


@pytest.fixture()
def many_files(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for j in range(6):
        (d / f"doc{j}.txt").write_text(TEXT)
    return d


def record_reads(monkeypatch, corpus: Path, on_read=None) -> list[str]:
    """The corpus files whose text the build's stream reads, in order (``on_read(name)`` runs before each read);
    not the reads of the thread that counts the rows for the progress bar."""
    reads = []
    real = corpus_mod._read_text

    def spy(path, stats):
        if Path(path).parent == corpus and threading.current_thread() is threading.main_thread():
            if on_read:
                on_read(Path(path).name)
            reads.append(Path(path).name)
        return real(path, stats)

    monkeypatch.setattr(corpus_mod, "_read_text", spy)
    return reads


def test_first_shard_is_finished_before_the_corpus_is_read_to_its_end(many_files, tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "out"
    seen = {}

    def on_read(name):  # the state of the output when the last file is opened
        if name == "doc5.txt":
            seen["done"] = sorted(p.name for p in out.glob("part-*.done"))

    reads = record_reads(monkeypatch, many_files, on_read)
    s = run_build(cfg(many_files, tiny_teacher, out, seqs_per_shard=1))
    assert reads == [f"doc{j}.txt" for j in range(6)]
    assert s.shards_written > 3 and len(seen["done"]) >= 3  # a rank that held every row first would have none


def test_a_rank_with_enough_files_reads_only_its_own(many_files, tiny_teacher, tmp_path, monkeypatch):
    out = tmp_path / "ranks"
    reads = record_reads(monkeypatch, many_files)
    run_build(cfg(many_files, tiny_teacher, out, rank=1, world_size=3))
    assert reads == ["doc1.txt", "doc4.txt"]  # files[1::3], each read once (the text; the digest reads bytes)
    reads.clear()
    run_build(cfg(many_files, tiny_teacher, out, rank=0, world_size=3))
    assert reads == ["doc0.txt", "doc3.txt"]
    assert {f.split("-")[1] for f in shard_hashes(out)} == {"00000", "00001"}
    with pytest.raises(ValidationError, match=r"ranks 2 of 3 finished \(rank 2 never started\)"):
        validate_dir(out)  # every shard there is valid, but the world is not finished
    run_build(cfg(many_files, tiny_teacher, out, rank=2, world_size=3))
    validate_dir(out)


def test_changed_contents_of_a_ranks_files_are_refused_on_rerun(many_files, tiny_teacher, tmp_path):
    out = tmp_path / "out"
    run_build(cfg(many_files, tiny_teacher, out, max_sequences=2))
    f = many_files / "doc2.txt"
    text = f.read_text()
    f.write_text(text[1] + text[0] + text[2:])  # same name, same size, other bytes
    with pytest.raises(UserError, match="corpus files of rank 0 changed"):
        run_build(cfg(many_files, tiny_teacher, out, max_sequences=2))
    again = run_build(cfg(many_files, tiny_teacher, out, max_sequences=2, fresh=True))
    assert again.shards_written == 1
    # the manifest's fingerprint (names and sizes) is unchanged: the per-rank digest is what caught it
    assert run_build(cfg(many_files, tiny_teacher, out, max_sequences=2)).shards_skipped == 1
