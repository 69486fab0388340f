"""`kdtrain export`: the exported folder loads with transformers in a fresh process, without ar2mdm
on the path, and computes kdtrain's logits and samples."""

import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from ar2mdm.student.denoise import denoise
from ar2mdm.train.checkpoint import load_student
from ar2mdm.train.cli import app
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.loop import run_training

LOAD = r"""
import json, sys, torch
from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
d, ids = sys.argv[1], json.loads(sys.argv[2])
assert "ar2mdm" not in sys.modules
m = AutoModelForMaskedLM.from_pretrained(d, trust_remote_code=True).eval()
base = AutoModel.from_pretrained(d, trust_remote_code=True).eval()
tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
x = torch.tensor(ids)
with torch.no_grad():
    logits, logits2 = m(x).logits, base(input_ids=x).logits
out = m.diffusion_generate(x[:1, :5], max_new_tokens=8, steps=4, temperature=0.7, seed=3)
two = m.diffusion_generate(x[:, :2], max_new_tokens=6, steps=3, seed=5)  # a batch of prompts, row b seeded 5 + b
_, ran = m.diffusion_generate(x[:1, :3], max_new_tokens=8, steps=32, seed=3, return_forwards=True)
print(json.dumps({"logits": logits.tolist(), "same": torch.equal(logits, logits2), "generated": out.tolist(),
                  "batch": two.tolist(), "forwards": ran.tolist(),
                  "mask_token_id": m.config.mask_token_id, "vocab": len(tok),
                  "ar2mdm_loaded": "ar2mdm" in sys.modules}))
"""


def run_exported(script: str, folder, ids: torch.Tensor, tmp_path) -> dict:
    """``script`` run on the exported ``folder`` and ``ids`` in a fresh process, offline and without ar2mdm on its
    path: the JSON of its last line."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), PYTHONPATH="")
    p = subprocess.run(
        [sys.executable, "-c", script, str(folder), json.dumps(ids.tolist())],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("student", ["tiny", "untied-shift"])
def test_exported_student_loads_in_a_fresh_process_and_matches_kdtrain(tiny_shards, tmp_path, student):
    spec = student
    if student == "untied-shift":
        spec = tmp_path / "student.json"
        spec.write_text(
            json.dumps(
                dict(
                    hidden_size=64,
                    num_layers=1,
                    num_heads=4,
                    num_kv_heads=2,
                    intermediate_size=96,
                    tie_embeddings=False,
                    shift=True,
                )
            )
        )
    run = tmp_path / "run"
    run_training(TrainConfig(shards=str(tiny_shards), out=str(run), student=str(spec), steps=2, progress=False))
    out = tmp_path / "export"
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert {"config.json", "model.safetensors", "modeling_ar2mdm.py", "tokenizer.json", "README.md"} <= {
        p.name for p in out.iterdir()
    }
    model, _ = load_student(run)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, 12), generator=g)
    ids[:, 0] = 1
    ids[0, 3:7] = model.config.mask_id  # some masked positions
    res = run_exported(LOAD, out, ids, tmp_path)
    assert not res["ar2mdm_loaded"] and res["same"] and res["mask_token_id"] == V
    with torch.no_grad():
        ref = model(ids)
    assert torch.allclose(torch.tensor(res["logits"]), ref, atol=1e-5)
    x = torch.cat([ids[:1, :5], torch.full((1, 8), V)], 1)
    want = denoise(model, x, 4, temperature=0.7, seeds=[3])
    assert res["generated"] == want.tolist()
    x2 = torch.cat([ids[:, :2], torch.full((2, 6), V)], 1)
    assert res["batch"] == denoise(model, x2, 3, seeds=[5, 6]).tolist()  # kdtrain sample's sampler, batched
    assert (torch.tensor(res["generated"]) != V).all()  # every mask filled
    # the forwards it ran, as kdtrain sample counts them: 32 steps asked of 8 tokens run 8 forwards
    _, ran = denoise(model, torch.cat([ids[:1, :3], torch.full((1, 8), V)], 1), 32, seeds=[3], return_forwards=True)
    assert res["forwards"] == ran.tolist() == [8]
    r = CliRunner().invoke(app, ["export", str(run), "--out", str(out)])
    assert r.exit_code != 0 and "--overwrite" in r.output


GENERATE = r"""
import json, sys, torch
from transformers import AutoModelForMaskedLM
m = AutoModelForMaskedLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
x = torch.tensor(json.loads(sys.argv[2]))
out, forwards = m.diffusion_generate(x, max_new_tokens=11, threshold=0.5, seed=3, temperature=0.8, return_forwards=True)
with torch.no_grad():
    logits = m(x).logits
res = {"generated": out.tolist(), "forwards": forwards.tolist(), "logits": logits.tolist()}
print(json.dumps({**res, "ar2mdm": "ar2mdm" in sys.modules}))
"""


def test_an_exported_block_student_generates_as_kdtrain_does(block_shards, tmp_path):
    from ar2mdm.student.block_sampler import block_generate

    run = tmp_path / "run"
    run_training(TrainConfig(shards=str(block_shards), out=str(run), student="tiny", steps=1, progress=False))
    out = tmp_path / "export"
    assert CliRunner().invoke(app, ["export", str(run), "--out", str(out)]).exit_code == 0
    model, _ = load_student(run)
    assert model.config.block_size == 8
    prompt = torch.tensor([[1, 5, 9, 12, 7], [1, 3, 3, 8, 2]])
    res = run_exported(GENERATE, out, prompt, tmp_path)
    want, forwards = block_generate(model, prompt, 11, threshold=0.5, seeds=[3, 4], temperature=0.8)
    assert res["generated"] == want.tolist() and not res["ar2mdm"]
    assert res["forwards"] == forwards.tolist()  # the forwards kdtrain sample counts for tokens per forward
    with torch.no_grad():
        assert torch.allclose(torch.tensor(res["logits"]), model(prompt, context=prompt), atol=1e-5)
