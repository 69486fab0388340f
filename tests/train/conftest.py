from pathlib import Path

import pytest

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig
from tests.tiny import TEXT


def build_tiny_shards(out: Path, teacher: Path, corpus_dir: Path, **kw) -> Path:
    corpus_dir.mkdir(parents=True, exist_ok=True)
    (corpus_dir / "a.txt").write_text(TEXT * 4)
    base = dict(
        corpus=str(corpus_dir),
        teacher=str(teacher),
        out=str(out),
        seq_len=32,
        k=3,
        window=4,
        top_n=4,
        seqs_per_shard=3,
        masks_per_seq=2,
        progress=False,
    )
    base.update(kw)
    run_build(BuildConfig(**base))
    return out


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory, tiny_teacher) -> Path:
    d = tmp_path_factory.mktemp("shards")
    return build_tiny_shards(d / "shards", tiny_teacher, d / "corpus")


@pytest.fixture(scope="session")
def tiny_shards_all(tmp_path_factory, tiny_teacher) -> Path:
    d = tmp_path_factory.mktemp("shards_all")
    return build_tiny_shards(d / "shards", tiny_teacher, d / "corpus", positions="all", masks_per_seq=1)


@pytest.fixture(scope="session")
def block_shards(tmp_path_factory, tiny_teacher) -> Path:
    """topk targets for a block student: rows of 32 tokens in blocks of 8."""
    d = tmp_path_factory.mktemp("blocks")
    return build_tiny_shards(d / "shards", tiny_teacher, d / "corpus", block_size=8, masks_per_seq=1, window="all")
