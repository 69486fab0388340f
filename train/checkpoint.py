"""Run folders: ``RUN/checkpoint/`` holds model.safetensors, config.json, the tokenizer and the training state.

A checkpoint is written into ``checkpoint.tmp`` and swapped in by renames, so a crash never leaves a torn one.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ar2mdm.schemas import Manifest, SchemaError
from ar2mdm.schemas.manifest import TOKENIZER_DIR
from ar2mdm.shared.errors import UserError
from ar2mdm.student.model import Student, StudentConfig

CKPT = "checkpoint"


def save_checkpoint(
    run: Path, state_dict: dict, config: StudentConfig, *, meta: dict, state: dict, tokenizer_dir: Path
) -> None:
    """Write RUN/checkpoint atomically: weights (an unsharded state dict), config, training state, tokenizer."""
    final = run / CKPT
    tmp = run / f"{CKPT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    sd = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    save_file(sd, str(tmp / "model.safetensors"))
    cfg = {"student": config.to_dict(), **meta, "step": state.get("step")}  # the step: what a sample came from
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2))
    torch.save(state, tmp / "state.pt")
    shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR)
    old = run / f"{CKPT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def checkpoint_dir(run: Path) -> Path:
    d = Path(run) / CKPT
    if not (d / "model.safetensors").exists():
        old = Path(run) / f"{CKPT}.old"  # a crash between the two renames leaves the previous one here
        if (old / "model.safetensors").exists():
            return old
        raise UserError(f"{run}: no checkpoint (expected {d}/model.safetensors)")
    return d


def load_meta(run: Path) -> dict:
    return json.loads((checkpoint_dir(run) / "config.json").read_text())


def run_task(meta: dict) -> tuple[str, str | None]:
    """(task, sft_format) a run was trained on: from its checkpoint, or for a checkpoint that does not record it
    from the manifest of the shards it names (pretrain where they are gone)."""
    if "task" in meta:
        return meta["task"], meta.get("sft_format")
    try:
        m = Manifest.load(meta["shards"])
    except (SchemaError, KeyError, OSError):
        return "pretrain", None
    return m.task, m.sft_format


def load_student(run: Path, device: str = "cpu") -> tuple[Student, dict]:
    d = checkpoint_dir(run)
    meta = json.loads((d / "config.json").read_text())
    model = Student(StudentConfig(**meta["student"]))
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.to(device).eval(), meta


def run_tokenizer(run: Path):
    """The tokenizer a run was trained with: its checkpoint's copy of the shards' tokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(checkpoint_dir(run) / TOKENIZER_DIR)
