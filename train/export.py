"""`kdtrain export RUN --out DIR`: the student as a folder that transformers loads, as LLaDA and Dream ship theirs.

transformers has no bidirectional Llama with a mask token and an AR shift, so the folder carries its modelling
code (``modeling_ar2mdm.py``, loaded with ``trust_remote_code=True`` through ``auto_map``). That file is
generated, never hand-copied: it is the source of `ar2mdm.train.model` (the student, which imports nothing of
ar2mdm but one error class) and of `ar2mdm.train.denoise` (its sampler), followed by a thin transformers wrapper.
So the exported model computes exactly what ``kdtrain`` computes, and ``diffusion_generate`` is ``kdtrain
sample``'s sampler.

    from transformers import AutoModelForMaskedLM, AutoTokenizer
    model = AutoModelForMaskedLM.from_pretrained(DIR, trust_remote_code=True)
    tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # reads config.json, hence the flag
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

from ar2mdm.shared.errors import UserError

MODEL_TYPE = "ar2mdm_student"
MODULE = "modeling_ar2mdm"
_IMPORT = "from ar2mdm.shared.errors import UserError\n"

_WRAPPER = '''

# ------------------------------------------------------------------ transformers wrapper (kdtrain export)

from transformers import PretrainedConfig, PreTrainedModel  # noqa: E402
from transformers.modeling_outputs import MaskedLMOutput  # noqa: E402


class Ar2mdmConfig(PretrainedConfig):
    """``student``: the StudentConfig fields; ``mask_token_id`` = student vocab_size (one past the tokenizer's)."""

    model_type = "ar2mdm_student"

    def __init__(self, student=None, mask_token_id=None, stop_token_ids=None, chat=False, **kwargs):
        self.student = dict(student or {})
        self.mask_token_id = mask_token_id
        self.stop_token_ids = list(stop_token_ids or [])  # what ends an answer (EOS, the template's end of turn)
        self.chat = chat  # trained on chats (--task sft): diffusion_generate stops at the end of turn
        super().__init__(**kwargs)


class Ar2mdmForMaskedLM(PreTrainedModel):
    """A masked diffusion LM distilled by ar2mdm: p_θ(x_0 | x_t) at every position, bidirectional attention."""

    config_class = Ar2mdmConfig
    base_model_prefix = "student"
    _no_split_modules = ["Block"]

    def __init__(self, config):
        super().__init__(config)
        self.student = Student(StudentConfig(**config.student))
        self.post_init()

    def _init_weights(self, module):
        Student._init(module)

    def forward(self, input_ids, attention_mask=None, **kwargs):
        """Logits (B, L, V) for ids (B, L) in which masked positions hold ``config.mask_token_id``.

        Every position attends to every other (the student was trained on full rows), so padding is refused."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("this student attends to the whole row: pass rows without padding")
        return MaskedLMOutput(logits=self.student(input_ids))

    @torch.no_grad()
    def diffusion_generate(self, input_ids, max_new_tokens=32, steps=32, temperature=1.0, remasking="random",
                           seed=0, block_length=None, stop_at_end_of_turn=None):
        """Append ``max_new_tokens`` masks to each row of ``input_ids`` (B, P) (prompts of one length) and fill
        them with ``kdtrain sample``'s sampler (``denoise``: by default the student's own distribution, random
        order at temperature 1; ``remasking="low-confidence", temperature=0``: LLaDA's greedy decoding;
        ``block_length``: block by block, left to right); row b draws with seed ``seed + b``.
        ``stop_at_end_of_turn`` (default: on for a chat student, trained with --task sft): an answer ends at its
        first end-of-turn/EOS token (``config.stop_token_ids``), which is kept; the positions after it hold the
        pad token (EOS). Returns (B, P + n) ids, n <= max_new_tokens."""
        stop = self.config.chat if stop_at_end_of_turn is None else stop_at_end_of_turn
        stops = tuple(self.config.stop_token_ids or ()) if stop else ()
        B, P = input_ids.shape
        masks = torch.full((B, max_new_tokens), self.config.mask_token_id, dtype=torch.long, device=input_ids.device)
        x = torch.cat([input_ids.long(), masks], dim=1)
        x = denoise(self.student, x, steps, temperature=temperature, remasking=remasking,
                    seeds=[seed + b for b in range(B)], block_length=block_length, stop_ids=stops)
        if not stops:
            return x
        answers = [cut_at_stop(row[P:].tolist(), stops, keep_stop=True) for row in x]
        n = max(len(a) for a in answers)
        pad = self.config.eos_token_id if self.config.eos_token_id is not None else stops[0]
        out = torch.full((B, P + n), pad, dtype=torch.long, device=x.device)
        out[:, :P] = x[:, :P]
        for b, a in enumerate(answers):
            out[b, P : P + len(a)] = torch.tensor(a, dtype=torch.long)
        return out
'''


def modelling_source() -> str:
    """``modeling_ar2mdm.py``: the sources of ar2mdm.train.model and ar2mdm.train.denoise, self-contained, plus
    the transformers wrapper."""
    from ar2mdm.train import denoise, model

    sampler = inspect.getsource(denoise).replace("from __future__ import annotations\n", "")
    src = inspect.getsource(model) + "\n\n# " + "-" * 66 + " the sampler (ar2mdm/train/denoise.py)\n" + sampler
    if _IMPORT not in src:
        raise RuntimeError("ar2mdm.train.model no longer imports UserError as export expects; update train/export.py")
    src = src.replace(
        _IMPORT, 'class UserError(ValueError):\n    """A student configuration that cannot be built."""\n'
    )
    if "import ar2mdm" in src or "from ar2mdm" in src:  # the file must load where ar2mdm is not installed
        raise RuntimeError("ar2mdm.train.model imports ar2mdm: its exported copy would not load on its own")
    return (
        f"# Generated by `kdtrain export` (ar2mdm {_version()}): ar2mdm/train/model.py, ar2mdm/train/denoise.py and "
        "a transformers wrapper.\n" + src + _WRAPPER
    )


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
    tok_dir = src / "tokenizer"
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
        "ar2mdm": {k: v for k, v in meta.items() if k != "student"},  # how it was trained (targets, λ, T, ...)
        **special,
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, default=str))
    (tmp / f"{MODULE}.py").write_text(modelling_source())
    (tmp / "README.md").write_text(_card(run, student))
    if dst.exists():
        dst.rmdir()
    os.replace(tmp, dst)
    return dst


def _card(run: str, student: dict) -> str:
    return f"""# A masked diffusion LM distilled with ar2mdm

Exported from the kdtrain run `{run}`: {student["num_layers"]} layers, hidden size {student["hidden_size"]},
vocabulary {student["vocab_size"]} (+ the mask token, id {student["vocab_size"]}), bidirectional attention
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
