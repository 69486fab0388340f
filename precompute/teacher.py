"""Locating, converting and loading the AR teacher (a Hugging Face folder or a GGUF file), offline.

A GGUF teacher is converted once into a safetensors folder under the cache (``$AR2MDM_CACHE``, default
``~/.cache/ar2mdm``): transformers dequantizes GGUF on every load (~15 s for SmolLM2-135M), a folder loads in
about a second and other engines (vLLM) read it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ar2mdm.schemas import TeacherInfo, TokenizerInfo
from ar2mdm.shared.defaults import default_teacher
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.tokenizer import special_ids, tokenizer_hash

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")
# config keys that say how a file was loaded, not what the model computes
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype")


def quiet_transformers() -> None:
    """No per-tensor progress bars or load reports from transformers: our own bar is the one to read."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def cache_root() -> Path:
    return Path(os.environ.get("AR2MDM_CACHE", Path.home() / ".cache" / "ar2mdm"))


def file_sha256_cached(path: Path) -> str:
    """sha256 of a (possibly multi-GB) file, remembered by (path, size, mtime) so reruns do not rehash."""
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    index = cache_root() / "sha256.json"
    try:
        known = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        known = {}
    if key in known:
        return known[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    known[key] = h.hexdigest()
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"sha256.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, index)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return known[key]


def resolve_teacher(spec: str | None) -> tuple[Path, str]:
    """(HF folder to load, weights sha256) for a teacher given as a folder, a .gguf file, or None (the default)."""
    path = Path(spec) if spec else default_teacher()
    if not path.exists():
        raise UserError(f"teacher {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"teacher {path}: expected a Hugging Face model folder or a .gguf file")
        sha = file_sha256_cached(path)
        return _converted_gguf(path, sha), sha
    if not (path / "config.json").exists():
        raise UserError(f"teacher {path} does not load: no config.json in the folder")
    weights = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise UserError(f"teacher {path} does not load: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the folder")
    h = hashlib.sha256()
    for f in weights:
        h.update(f.name.encode() + b"\0" + file_sha256_cached(f).encode())
    return path, h.hexdigest()


def _converted_gguf(gguf: Path, sha: str) -> Path:
    out = cache_root() / "teachers" / f"{gguf.stem}-{sha[:16]}"
    if (out / "config.json").exists():
        return out
    quiet_transformers()
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:
        raise UserError(f"teacher {gguf} does not load: {_first_line(e)}") from e
    # save_pretrained refuses a GGUF-loaded model while it still names its quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ar2mdm_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
    os.replace(tmp, out)
    return out


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def config_sha256(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"teacher {folder}: tokenizer does not load: {_first_line(e)}") from e


def tokenizer_info(tokenizer, vocab_size: int) -> TokenizerInfo:
    bos, eos = special_ids(tokenizer)
    return TokenizerInfo(sha256=tokenizer_hash(tokenizer), vocab_size=vocab_size, bos_id=bos, eos_id=eos)


def teacher_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"teacher {folder} does not load: {_first_line(e)}") from e


def teacher_info(spec: str | None, folder: Path, weights_sha: str, config) -> TeacherInfo:
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    max_pos = getattr(config, "max_position_embeddings", None) or 0
    return TeacherInfo(
        path=str(spec) if spec else str(default_teacher()),
        architecture=arch,
        weights_sha256=weights_sha,
        config_sha256=config_sha256(config),
        max_positions=int(max_pos),
    )


def vocab_size_of(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


@dataclass
class TorchTeacher:
    """A causal LM loaded with transformers, eval mode, no grad; the torch backend's engine."""

    model: object
    device: str
    dtype: str

    @classmethod
    def load(cls, folder: Path, device: str = "auto", dtype: str = "auto") -> "TorchTeacher":
        import torch
        from transformers import AutoModelForCausalLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        quiet_transformers()
        try:
            model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype), attn_implementation="sdpa")
        except Exception as e:
            raise UserError(f"teacher {folder} does not load: {_first_line(e)}") from e
        model.to(device).eval()
        return cls(model=model, device=device, dtype=dtype)
