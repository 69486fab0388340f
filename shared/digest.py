"""sha256 of files, read in blocks: the one loop every fingerprint of ar2mdm (shards, model weights, corpus files)
is made of."""

from __future__ import annotations

import hashlib
from pathlib import Path

BLOCK = 1 << 22


def update_with_file(h, path: str | Path) -> None:
    """Feed the bytes of ``path`` into the running hash ``h``."""
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(BLOCK), b""):
            h.update(block)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    update_with_file(h, path)
    return h.hexdigest()
