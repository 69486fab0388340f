"""`kdtrain export RUN --out DIR`: the student as a folder that transformers loads, as LLaDA and Dream ship theirs.

transformers has no bidirectional (or block-causal) Llama with a mask token and an AR shift, so the folder carries
its modelling code, loaded with ``trust_remote_code=True`` through ``auto_map``: the modules of `ar2mdm.student`,
copied as they are (`sources`): the wrapper `modeling_ar2mdm`, the model, its cache and block rules, and the
samplers. So the exported model computes exactly what ``kdtrain`` computes, and ``diffusion_generate`` is
``kdtrain sample``'s sampler.

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # reads config.json, hence the flag
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ar2mdm.schemas.manifest import TOKENIZER_DIR
from ar2mdm.shared.errors import UserError

MODEL_TYPE = "ar2mdm_student"
MODULE = "modeling_ar2mdm"


def sources() -> list[Path]:
    """The files the exported folder runs: every module of the student package (the wrapper and what it imports),
    as ar2mdm ships them."""
    import ar2mdm.student

    return sorted(p for p in Path(ar2mdm.student.__file__).parent.glob("*.py") if p.name != "__init__.py")


def copy_sources(dst: Path) -> None:
    """The student's modules into ``dst``, as they are: they import each other relatively and nothing else of
    ar2mdm, so they load where ar2mdm is not installed."""
    for path in sources():
        shutil.copy2(path, dst / path.name)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ar2mdm")
    except PackageNotFoundError:
        return "unknown"


def export(run: str, out: str, overwrite: bool = False) -> Path:
    """Write the run's checkpoint as a transformers folder ``out``; returns its path."""
    from safetensors.torch import load_file, save_file

    from ar2mdm.train.checkpoint import checkpoint_dir

    src = checkpoint_dir(Path(run))
    meta = json.loads((src / "config.json").read_text())
    dst = Path(out)
    if dst.exists() and any(dst.iterdir()):
        if not overwrite:
            raise UserError(f"{dst} exists and is not empty; pass --overwrite to replace it")
        shutil.rmtree(dst)
    tmp = dst.with_name(dst.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    weights = {f"student.{k}": v.contiguous() for k, v in load_file(str(src / "model.safetensors")).items()}
    save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    student = meta["student"]
    tok_dir = src / TOKENIZER_DIR
    for f in tok_dir.iterdir():
        shutil.copy2(f, tmp / f.name)
    special = {}
    tok_cfg = tok_dir / "tokenizer_config.json"
    if tok_cfg.exists():
        from transformers import AutoTokenizer

        from ar2mdm.shared.tokenizer import stop_ids

        tok = AutoTokenizer.from_pretrained(tok_dir)  # its chat template travels in these files too
        special = {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "stop_token_ids": stop_ids(tok)}
    from ar2mdm.train.checkpoint import run_task

    special["chat"] = run_task(meta)[0] == "sft"
    cls = f"{MODULE}.Ar2mdmForMaskedLM"
    config = {
        "model_type": MODEL_TYPE,
        "architectures": ["Ar2mdmForMaskedLM"],
        "auto_map": {"AutoConfig": f"{MODULE}.Ar2mdmConfig", "AutoModel": cls, "AutoModelForMaskedLM": cls},
        "student": student,
        "mask_token_id": student["vocab_size"],
        "tie_word_embeddings": False,  # the student ties inside its own head; nothing for transformers to tie
        "torch_dtype": "float32",
        # how it was trained (targets, λ, T, ...), and by which ar2mdm
        "ar2mdm": {**{k: v for k, v in meta.items() if k != "student"}, "version": _version()},
        **special,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    copy_sources(tmp)
    (tmp / "README.md").write_text(_card(run, student))
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return dst


def _card(run: str, student: dict) -> str:
    return f"""# A masked diffusion LM distilled with ar2mdm

Exported from the kdtrain run `{run}`: {student["num_layers"]} layers, hidden size {student["hidden_size"]},
vocabulary {student["vocab_size"]} (+ the mask token, id {student["vocab_size"]}), {_attention(student)}
{"with" if student.get("shift") else "without"} the AR shift.

```python
import torch
from transformers import AutoModelForMaskedLM, AutoTokenizer

model = AutoModelForMaskedLM.from_pretrained("PATH", trust_remote_code=True)
tok = AutoTokenizer.from_pretrained("PATH", trust_remote_code=True)
ids = torch.tensor([[tok.bos_token_id] + tok("To be, or not", add_special_tokens=False).input_ids])
out = model.diffusion_generate(ids, max_new_tokens=16, steps=16)
print(tok.decode(out[0, ids.shape[1]:]))
```
"""


def _attention(student: dict) -> str:
    b = student.get("block_size")
    return (
        "bidirectional attention"
        if b is None
        else f"attention causal across blocks of {b} tokens, bidirectional inside one,"
    )
