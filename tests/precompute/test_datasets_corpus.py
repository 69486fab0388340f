"""Corpora through `datasets`: a save_to_disk folder (any split, any text field) and hf:NAME read
offline build exactly the rows the same documents give as files; bad datasets are one-line errors."""

import json

import numpy as np
import pytest

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.shards import read_shard
from ar2mdm.shared.validate import validate_dir
from tests.precompute.test_build import cfg as build_cfg
from tests.tiny import TEXT

datasets = pytest.importorskip("datasets")

SENTENCES = [s.strip() + "." for s in TEXT.replace("?", ".").replace("!", ".").split(".") if len(s.strip()) > 8]


def cfg(corpus, teacher, out, **kw) -> BuildConfig:
    return build_cfg(corpus, teacher, out, **{"seqs_per_shard": 4, **kw})  # test_build's, 4 sequences a shard


def rows(out):
    m = validate_dir(out)
    parts = [read_shard(out / s.file) for s in m.shards]
    return m, np.concatenate([p.input_ids for p in parts]), np.concatenate([p.target_ids for p in parts])


def test_a_saved_dataset_split_builds_the_rows_its_documents_give_as_files(tiny_teacher, tmp_path):
    train, test = SENTENCES[: len(SENTENCES) // 2], SENTENCES[len(SENTENCES) // 2 :]
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": train, "n": list(range(len(train)))}),
            "test": datasets.Dataset.from_dict({"content": test, "n": list(range(len(test)))}),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "test.jsonl").write_text("".join(json.dumps({"content": t}) + "\n" for t in test))
    run_build(cfg(tmp_path / "ds", tiny_teacher, tmp_path / "a", split="test", text_field="content"))
    run_build(cfg(tmp_path / "files", tiny_teacher, tmp_path / "b", text_field="content"))
    ma, ia, ta = rows(tmp_path / "a")
    _, ib, tb = rows(tmp_path / "b")
    assert len(ia) > 0
    np.testing.assert_array_equal(ia, ib)  # the test split, packed exactly like the same documents as a file
    np.testing.assert_array_equal(ta, tb)
    # a rerun recognises the same dataset (datasets' fingerprint) and skips the finished work
    again = run_build(cfg(tmp_path / "ds", tiny_teacher, tmp_path / "a", split="test", text_field="content"))
    assert again.shards_written == 0 and again.shards_skipped == len(ma.shards)
    # the other split is another corpus: refused in that folder
    with pytest.raises(UserError, match="corpus"):
        run_build(cfg(tmp_path / "ds", tiny_teacher, tmp_path / "a", split="train", text_field="content"))


def test_hf_name_reads_a_dataset_offline_with_a_messages_field(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    chats = [
        [{"role": "user", "content": s}, {"role": "assistant", "content": t}] for s, t in zip(SENTENCES, SENTENCES[1:])
    ]
    repo = tmp_path / "repo" / "data"
    repo.mkdir(parents=True)
    datasets.Dataset.from_dict({"conversation": chats}).to_parquet(str(repo / "train-00000-of-00001.parquet"))
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "chats.jsonl").write_text("".join(json.dumps({"messages": c}) + "\n" for c in chats))
    from tests.tiny import char_tokenizer, tiny_llama

    teacher = tmp_path / "teacher"  # the tiny teacher with a chat template
    tok = char_tokenizer()
    tok.chat_template = "<s>{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
    tok.save_pretrained(teacher)
    tiny_llama(len(tok)).save_pretrained(teacher)
    run_build(
        cfg(f"hf:{tmp_path / 'repo'}", teacher, tmp_path / "a", messages_field="conversation", task="sft", seq_len=48)
    )
    run_build(cfg(tmp_path / "files", teacher, tmp_path / "b", task="sft", seq_len=48))
    _, ia, ta = rows(tmp_path / "a")
    assert len(ia) > 0
    _, ib, tb = rows(tmp_path / "b")
    np.testing.assert_array_equal(ia, ib)
    np.testing.assert_array_equal(ta, tb)


def test_bad_datasets_are_one_line_errors(tiny_teacher, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": SENTENCES})}).save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(UserError, match=r"no split 'validation' \(splits: train\); pass --split"):
        run_build(cfg(tmp_path / "ds", tiny_teacher, tmp_path / "o", split="validation"))
    with pytest.raises(UserError, match=r"none of the fields text \(columns: body\); pass --text-field"):
        run_build(cfg(tmp_path / "ds", tiny_teacher, tmp_path / "o"))
    with pytest.raises(UserError, match="dataset nobody/nothing: cannot be loaded offline"):
        run_build(cfg("hf:nobody/nothing", tiny_teacher, tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing written for a corpus that cannot be read
