"""The build manifest (``manifest.json``): what was built, from what, how, and which shards exist.

The manifest is explicit, versioned code: a dataclass that is written with every field and read back with a
check of its schema version. ``build_key()`` is the part of it that must match for a rerun into the same
output folder to be allowed (same teacher, tokenizer, corpus, mode and parameters).
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ar2mdm.schemas.v1 import SCHEMA_VERSION, SchemaError

MANIFEST_NAME = "manifest.json"
TOKENIZER_DIR = "tokenizer"  # beside the manifest: the teacher's tokenizer, what the trainer reads (never the teacher)


@dataclass
class TeacherInfo:
    path: str
    architecture: str
    weights_sha256: str
    config_sha256: str
    max_positions: int


@dataclass
class TokenizerInfo:
    sha256: str  # hash of the sorted vocabulary and the special tokens (see shared.tokenizer.tokenizer_hash)
    vocab_size: int  # size of the teacher's output distribution (token ids are < vocab_size)
    bos_id: int
    eos_id: int


@dataclass
class ShardInfo:
    file: str
    rows: int
    target_positions: int
    bytes: int
    sha256: str


@dataclass
class RankInfo:
    """A rank's completion record: it read all of its share of the corpus and wrote these shards."""

    rank: int
    shards: int
    rows: int
    target_positions: int


@dataclass
class Manifest:
    schema_version: int
    format: str  # "parquet" or "safetensors"
    mode: str  # "topk", "mc" or "fim"
    task: str  # "pretrain" or "sft"
    seq_len: int
    seed: int
    params: dict[str, Any]  # every mode parameter (k, window, top_n, positions, ...)
    teacher: TeacherInfo
    tokenizer: TokenizerInfo
    corpus: dict[str, Any]  # {"path", "fingerprint", "files"}
    software_version: str
    world_size: int
    # True when a row's targets depend on its sampled mask (mc): the trainer must keep the stored mask.
    mask_dependent_targets: bool
    # True when every maskable position carries a target (--positions all): the trainer may resample masks.
    targets_at_all_positions: bool
    shards: list[ShardInfo] = field(default_factory=list)
    # The ranks that finished (one record each, written as a rank ends). None: a build by an ar2mdm older than
    # these records, whose completion is known only from its shards.
    ranks: list[RankInfo] | None = None
    # --task sft: how prompts were rendered, "chat-template" (rows with `messages`) or "plain" (`prompt` text), so
    # that eval and sample render a user's prompt the same way. From the corpus (part of the key): not in the key.
    sft_format: str | None = None
    # Rows from a student's states (`kdtargets build --states`): the run, its checkpoint step and the sampler they
    # came from. Their masked positions hold the student's own tokens, not the truth: the trainer computes no MDM
    # term on them. None for corpus rows (and then absent from manifest.json).
    states: dict[str, Any] | None = None

    @property
    def block_size(self) -> int | None:
        """The block size of a build for block students (``params["block_size"]``), None for whole rows."""
        b = self.params.get("block_size")
        return None if b is None else int(b)

    def build_key(self) -> dict[str, Any]:
        """Everything that must be equal for two runs to write into the same output folder."""
        d = dataclasses.asdict(self)
        d.pop("shards")
        d.pop("ranks")
        d.pop("sft_format")
        d.pop("software_version")
        d["teacher"].pop("path")  # the same weights may be found at another path
        d["corpus"].pop("path")
        return d

    def to_json(self) -> str:
        d = dataclasses.asdict(self)
        if d["states"] is None:
            del d["states"]
        return json.dumps(d, indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = MANIFEST_NAME) -> "Manifest":
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            raise SchemaError(f"{where}: manifest schema version {version}, this ar2mdm reads {SCHEMA_VERSION}")
        try:
            d = dict(d)
            d["teacher"] = TeacherInfo(**d["teacher"])
            d["tokenizer"] = TokenizerInfo(**d["tokenizer"])
            d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
            if d.get("ranks") is not None:
                d["ranks"] = [RankInfo(**r) for r in d["ranks"]]
            return cls(**d)
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{where}: malformed manifest ({e})") from e

    @classmethod
    def load(cls, directory: str | Path) -> "Manifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.exists():
            raise SchemaError(f"{directory}: no {MANIFEST_NAME} (not a kdtargets output folder?)")
        try:
            d = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path}: not valid JSON ({e})") from e
        return cls.from_dict(d, str(path))

    def missing_ranks(self) -> list[int]:
        """Ranks of the world without a completion record (empty for builds that predate the records)."""
        if self.ranks is None:
            return []
        done = {r.rank for r in self.ranks}
        return [r for r in range(self.world_size) if r not in done]

    def save(self, directory: str | Path) -> None:
        write_atomic(Path(directory) / MANIFEST_NAME, self.to_json().encode())


def tmp_path(path: Path) -> Path:
    """``path.tmp.HOST.PID``: unique per writer, and a stale one (its writer dead) is recognisable."""
    return path.with_name(f"{path.name}.tmp.{socket.gethostname()}.{os.getpid()}")


def write_atomic(path: Path, data: bytes) -> None:
    """Write to ``path.tmp.HOST.PID`` then rename: readers never see a half-written file."""
    tmp = tmp_path(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
