import os
from pathlib import Path

import pytest

from tests.tiny import TEXT, save_tiny_teacher

# Tests never touch the user's cache.
os.environ.setdefault("AR2MDM_CACHE", str(Path(__file__).parent / ".." / ".pytest_cache" / "ar2mdm"))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    return save_tiny_teacher(tmp_path_factory.mktemp("teacher"))


@pytest.fixture()
def tiny_corpus(tmp_path) -> Path:
    d = tmp_path / "corpus"
    d.mkdir()
    for j in range(3):
        (d / f"doc{j}.txt").write_text(TEXT * (j + 1))
    return d
