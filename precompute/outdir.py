"""The build's output folder: its manifest header, finished shards, and the partial shard of an interrupted run.

A folder belongs to one build key (teacher, tokenizer, corpus, mode, parameters). Finished shards are the
unit of resumption across ranks (``part-R-U.<fmt>`` + ``.done`` marker); within a shard, the sequences done so
far are flushed every ``--flush-seconds`` and on Ctrl-C to ``part-R-U.<fmt>.partial`` (Parquet, float32, so
that the finished shard is the same bytes as an uninterrupted run's), and a rerun continues after them. A rank
that has read all of its share of the corpus writes ``rank-R.done`` (its `RankInfo`): the build is finished when
every rank of the world has one.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import shutil
import socket
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np

from ar2mdm.schemas import Manifest, RankInfo, SchemaError, ShardInfo
from ar2mdm.schemas.manifest import MANIFEST_NAME, TOKENIZER_DIR, tmp_path, write_atomic
from ar2mdm.shared.digest import file_sha256
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.shards import (
    DONE_SUFFIX,
    RANK_DONE_GLOB,
    ShardData,
    concat_shards,
    rank_done_name,
    read_shard,
    write_shard,
)

PARTIAL_SUFFIX = ".partial"
# the fields a user sets on the command line come first when a refusal lists what differs
_FIRST = ("mode", "task", "seq_len", "seed", "params.", "teacher.", "tokenizer.", "corpus.")


def finished_work(out: Path) -> list[Path]:
    """Finished shards' markers and partial shards in ``out``: what a change of plan would throw away (a rank
    record alone is no work: it is written again in a second)."""
    return sorted(out.glob(f"part-*{DONE_SUFFIX}")) + sorted(out.glob(f"part-*{PARTIAL_SUFFIX}"))


def clear_build(out: Path) -> int:
    """--fresh: remove a build's own files from ``out`` (manifest, tokenizer, shards, markers, partials, the
    ranks' corpus digests, completion records and locks)."""
    n = 0
    for p in [out / MANIFEST_NAME, *out.glob("part-*"), *out.glob("corpus-rank-*"), *out.glob("rank-*")]:
        if p.is_file():
            p.unlink()
            n += 1
    if (out / TOKENIZER_DIR).is_dir():
        shutil.rmtree(out / TOKENIZER_DIR)
    return n


def prepare_out(out: Path, header: Manifest, content_digest: Callable[[], str] | None = None) -> None:
    """Create ``out`` with the manifest header, or check that an existing build there has the same key.

    A folder with no finished or partial shard holds no work: its plan is replaced (with a note), so a build
    that failed before its first shard never blocks the corrected rerun. ``content_digest``: the corpus
    fingerprint of names and contents (``files_sha256`` of every file), which some manifests record instead of
    names and sizes, computed only when that fingerprint is all that differs, so that their finished shards
    resume instead of being refused.
    """
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_NAME
    if not path.exists():
        tmp = tmp_path(path)
        tmp.write_text(header.to_json())
        try:
            os.link(tmp, path)  # atomic create-if-absent: two ranks starting together write it once
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        existing = Manifest.load(out)
        a, b = _flatten(existing.build_key()), _flatten(header.build_key())
    except SchemaError as e:
        if finished_work(out):
            raise UserError(f"--out {out} holds another build: {e}") from e
        a, b = {"manifest": "unreadable"}, {}
    if a == b:
        return
    if not finished_work(out):
        warn(f"--out {out}: replacing the plan of an unfinished build (it had no finished shard)")
        header.save(out)
        shutil.rmtree(out / TOKENIZER_DIR, ignore_errors=True)  # the teacher may have changed too
        for p in out.glob(RANK_DONE_GLOB):  # the replaced plan's ranks (empty ones) finished another build
            p.unlink()
        return
    diff = sorted((k for k in set(a) | set(b) if a.get(k) != b.get(k)), key=_priority)
    if diff == ["corpus.fingerprint"] and content_digest is not None and a[diff[0]] == content_digest():
        existing.corpus["fingerprint"] = header.corpus["fingerprint"]
        existing.save(out)
        warn(f"--out {out}: the build recorded its corpus by content (an earlier ar2mdm); same corpus, record updated")
        return
    detail = "; ".join(f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in diff[:6])
    more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
    raise UserError(
        f"--out {out} holds a build with other parameters ({detail}{more}); "
        "rerun with its parameters to resume it, or use another --out, or --fresh to delete it"
    )


@contextmanager
def rank_lock(out: Path, rank: int):
    """Hold ``rank-R.lock`` in ``out`` while this rank builds: a second build of the same rank into the same
    folder (two shells, a resubmitted array task) is refused in one line naming the first, instead of both doing
    all the work. flock: released by the kernel whenever the holder exits, kill -9 included."""
    path = out / f"rank-{rank:05d}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = path.read_text().strip() or "another process"
        os.close(fd)
        raise UserError(
            f"--out {out}: rank {rank} is being built there by {holder}; wait for it to finish, or use "
            "another --out (other ranks may build into the same --out at once)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    try:
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (harmless, and reused by the next run)


def remove_stale_tmps(out: Path) -> None:
    """Delete manifest/marker temporaries whose writer died (a kill between write and rename): only those of
    this host with a pid that no longer runs, so a live rank on this or another host is never disturbed."""
    host = socket.gethostname()
    for p in out.glob("*.tmp.*"):
        _, h, pid = p.name.rsplit(".", 2)
        if h == host and pid.isdigit() and not _alive(int(pid)):
            p.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _priority(key: str) -> tuple[int, str]:
    for j, p in enumerate(_FIRST):
        if key == p or (p.endswith(".") and key.startswith(p)):
            return j, key
    return len(_FIRST), key


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v) -> str:
    s = json.dumps(v, sort_keys=True, default=str)
    return s if len(s) <= 80 else s[:77] + "..."


def finalize_manifest(out: Path) -> Manifest:
    """Rewrite the manifest's shard and rank lists from the ``.done`` markers and rank records present.

    Re-listing until the lists are stable makes concurrent ranks converge: the rank whose marker appears last
    writes last, and its listing includes every earlier marker.
    """

    def markers() -> list[Path]:
        return sorted(out.glob(f"part-*{DONE_SUFFIX}")) + sorted(out.glob(RANK_DONE_GLOB))

    while True:
        manifest = Manifest.load(out)
        seen = markers()
        manifest.shards = [ShardInfo(**json.loads(m.read_text())) for m in seen if m.name.startswith("part-")]
        manifest.ranks = [RankInfo(**json.loads(m.read_text())) for m in seen if m.name.startswith("rank-")]
        manifest.save(out)
        if markers() == seen:
            return manifest


def finish_rank(out: Path, rank: int) -> Manifest:
    """Record that ``rank`` read all of its share of the corpus: its shards (those on disk now, every one of
    them finished) in ``rank-R.done``, then the manifest."""
    mine = [ShardInfo(**json.loads(m.read_text())) for m in out.glob(f"part-{rank:05d}-*{DONE_SUFFIX}")]
    info = RankInfo(
        rank=rank,
        shards=len(mine),
        rows=sum(s.rows for s in mine),
        target_positions=sum(s.target_positions for s in mine),
    )
    write_atomic(out / rank_done_name(rank), json.dumps(dataclasses.asdict(info)).encode())
    return finalize_manifest(out)


def finish_shard(out: Path, path: Path, parts: list[ShardData], *, fmt: str, logprob_dtype: str) -> ShardInfo:
    """Write a finished shard: its file (atomically), then its completion record, then the manifest that lists
    it; the partial file goes. Until the record exists, a rerun redoes the shard: a crash loses at most it."""
    data = concat_shards(parts)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write_shard(data, tmp, fmt, logprob_dtype)
    os.replace(tmp, path)
    info = ShardInfo(
        file=path.name,
        rows=data.rows,
        target_positions=data.num_targets,
        bytes=path.stat().st_size,
        sha256=file_sha256(path),
    )
    write_atomic(path.with_name(path.name + DONE_SUFFIX), json.dumps(dataclasses.asdict(info)).encode())
    partial_path(shard=path).unlink(missing_ok=True)
    finalize_manifest(out)  # the manifest lists every finished shard, even if the build stops later
    return info


class ShardWriter:
    """`finish_shard` on one background thread, so that the teacher computes the next shard while this one is
    encoded, compressed, hashed and written (Parquet and hashlib release the GIL). One shard in flight at most:
    memory holds two shards' rows, and shards land in order. An error in the writer (a full disk) is raised by
    the next `submit` or `wait`, as it was raised."""

    def __init__(self, out: Path, fmt: str, logprob_dtype: str):
        from concurrent.futures import ThreadPoolExecutor

        self.out, self.fmt, self.logprob_dtype = out, fmt, logprob_dtype
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="kdtargets-writer")
        self.pending = None
        self.done: list[ShardInfo] = []  # the shards this writer finished, in order

    def submit(self, path: Path, parts: list[ShardData]) -> None:
        self.wait()
        self.pending = self.pool.submit(
            finish_shard, self.out, path, parts, fmt=self.fmt, logprob_dtype=self.logprob_dtype
        )

    def wait(self) -> None:
        """Until the shard in flight is on disk with its record."""
        if self.pending is not None:
            pending, self.pending = self.pending, None
            self.done.append(pending.result())

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.pool.shutdown()


def partial_path(shard: Path) -> Path:
    return shard.with_name(shard.name + PARTIAL_SUFFIX)


def write_partial(shard: Path, data: ShardData) -> None:
    """The finished sequences of an unfinished shard, atomically (float32: no second rounding later)."""
    path = partial_path(shard)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write_shard(data, tmp, "parquet", "float32")
    os.replace(tmp, path)


def read_partial(shard: Path, expected_ids: list[str]) -> ShardData | None:
    """The partial shard's rows if they are this build's first rows of the shard (else discard it)."""
    path = partial_path(shard)
    if not path.exists():
        return None
    try:
        data = read_shard(path, fmt="parquet")
    except (SchemaError, OSError) as e:
        warn(f"{path}: unreadable ({e}); its sequences are redone")
        return None
    if data.example_ids != expected_ids[: data.rows]:
        warn(f"{path}: holds other rows than this build's; its sequences are redone")
        return None
    data.target_logprobs = np.asarray(data.target_logprobs, np.float32)
    return data
