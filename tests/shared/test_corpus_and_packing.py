import json

import pytest

from ar2mdm.shared.corpus import CorpusStats, SftExample, iter_documents, iter_sft_examples, list_corpus_files
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.tokenizer import PackStats, pack_documents, pack_sft, tokenizer_hash
from tests.tiny import char_tokenizer


def test_empty_and_binary_files_are_skipped_and_stray_bytes_replaced_with_a_warning(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("hello there")
    (tmp_path / "b.txt").write_text("   \n")
    (tmp_path / "c.md").write_bytes(b"\x00\x01\x02binary")
    (tmp_path / "d.py").write_bytes(
        "caf\u00e9 \ufffd ok".encode("latin-1", errors="ignore") + b" ok"
    )  # one latin-1 byte
    (tmp_path / "ignored.bin").write_bytes(b"whatever")
    files = list_corpus_files(tmp_path)
    assert [f.name for f in files] == ["a.txt", "b.txt", "c.md", "d.py"]
    stats = CorpusStats()
    docs = list(iter_documents(files, stats))
    assert [d.text for d in docs] == ["hello there", "caf\ufffd  ok ok"]  # the text is kept, the byte replaced
    assert (stats.skipped_empty, stats.skipped_binary) == (1, 1)  # binary means binary (a NUL byte)
    err = capsys.readouterr().err
    assert "empty file" in err and "binary file" in err
    assert "d.py: 1 byte sequence(s) that are not UTF-8 (the first at byte 3) replaced by U+FFFD" in err


def test_empty_corpus_folder_is_an_error(tmp_path):
    with pytest.raises(UserError, match="holds no"):
        list_corpus_files(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        list_corpus_files(tmp_path / "nope")


def test_jsonl_documents_and_bad_lines(tmp_path, capsys):
    f = tmp_path / "c.jsonl"
    f.write_text('{"text": "one"}\nnot json\n{"body": "x"}\n{"text": "two"}\n')
    stats = CorpusStats()
    assert [d.text for d in iter_documents([f], stats)] == ["one", "two"]
    assert stats.skipped_bad_rows == 2
    err = capsys.readouterr().err
    assert f"{f}:2" in err and f"{f}:3" in err


def test_sft_rows_without_response_are_skipped(tmp_path, capsys):
    f = tmp_path / "s.jsonl"
    rows = [
        {"prompt": "hi", "response": "yo"},
        {"prompt": "hi"},
        {"prompt": "a", "response": " "},
        {"messages": [{"role": "user", "content": "q"}]},
    ]
    f.write_text("\n".join(json.dumps(r) for r in rows))
    stats = CorpusStats()
    ex = list(iter_sft_examples([f], stats))
    assert len(ex) == 1 and ex[0].response == "yo"
    assert stats.skipped_bad_rows == 3
    assert capsys.readouterr().err.count("without a response") == 3


def test_packing_layout():
    tok = char_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    from ar2mdm.shared.corpus import Document

    docs = [Document("a", "abc"), Document("b", "defgh")]
    stats = PackStats()
    rows = list(pack_documents(docs, tok, 5, stats))
    # stream: a b c EOS d e f g h EOS -> rows of 4 body tokens behind BOS, remainder of 2 dropped
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert [r.tolist() for r in rows] == [[bos] + enc("abc") + [eos], [bos] + enc("defg")]
    assert stats.tokens_dropped == 2


def test_sft_layout_pads_with_eos_and_counts_prompt():
    tok = char_tokenizer()
    bos, eos = tok.bos_token_id, tok.eos_token_id
    rows = list(pack_sft([SftExample("x", prompt="ab", response="cd")], tok, 9))
    ids, plen = rows[0]
    assert plen == 3  # BOS + 2 prompt tokens
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids.tolist() == [bos] + enc("abcd") + [eos] * 4
    stats = PackStats()
    assert list(pack_sft([SftExample("y", prompt="abcdefghij", response="z")], tok, 9, stats)) == []
    assert stats.too_long == 1


def test_tokenizer_hash_survives_save_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = char_tokenizer()
    tok.save_pretrained(tmp_path)
    assert tokenizer_hash(AutoTokenizer.from_pretrained(tmp_path)) == tokenizer_hash(tok)
    other = char_tokenizer()
    other.add_tokens(["<extra>"])
    assert tokenizer_hash(other) != tokenizer_hash(tok)


def test_messages_through_a_chat_template_that_opens_with_bos():
    tok = char_tokenizer()
    tok.chat_template = "<s>{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
    bos = tok.bos_token_id
    ex = SftExample("x", messages=[{"role": "user", "content": "ab"}, {"role": "assistant", "content": "cd"}])
    ((ids, plen),) = list(pack_sft([ex], tok, 12))
    enc = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert ids.tolist()[:1] == [bos] and ids.tolist()[1] != bos  # one BOS, not the template's on top of ours
    assert plen == 1 + len(enc("ab"))
    assert ids.tolist()[plen : plen + 3] == enc(" cd")
