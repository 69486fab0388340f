"""`kdtargets build`, top to bottom: corpus -> rows -> masks -> teacher targets -> shards + manifest.

Sharding follows datatrove: documents are split ``[rank::world_size]``, each rank packs its own documents into
rows and groups them into shards of ``seqs_per_shard`` sequences; a shard is written to ``.tmp`` and renamed,
then a ``.done`` marker is written; a rerun skips shards whose marker exists, and a rerun with other
parameters into the same folder is refused. Every row's mask is a function of (seed, example_id) alone, so a
resumed build writes exactly the shards an uninterrupted one would.
"""

from __future__ import annotations

import os
import shutil
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from ar2mdm.precompute.autosize import resolve_auto
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.outdir import (
    TOKENIZER_DIR,
    ShardWriter,
    clear_build,
    finalize_manifest,
    finish_rank,
    finished_work,
    prepare_out,
    rank_lock,
    read_partial,
    remove_stale_tmps,
    write_partial,
)
from ar2mdm.precompute.plan import BuildPlan, plan_build, rank_stream, shard_chunks, warn_skipped
from ar2mdm.precompute.sparsify import support_size
from ar2mdm.precompute.targets import TargetPlan, build_rows
from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer
from ar2mdm.schemas.manifest import write_atomic
from ar2mdm.shared.corpus import CorpusStats, files_sha256, rank_share
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.shards import DONE_SUFFIX, ShardData, concat_shards, rank_started_name, shard_name
from ar2mdm.shared.tokenizer import PackStats


@dataclass
class BuildSummary:
    out: str
    shards_written: int
    shards_skipped: int
    rows: int
    target_positions: int
    seconds: float
    backend: str = "hf"
    resumed_sequences: int = 0  # sequences taken from partial shards of an interrupted run
    empty_rank: str | None = None  # why this rank of a world had no row (it finished with no shard)


# ------------------------------------------------------------------------------------------------- run


def engine_max_logprobs(cfg: BuildConfig) -> int:
    """The most log-probs any request of this build asks vLLM for (its engine must allow that many)."""
    from ar2mdm.precompute.mc.particles import next_token_keep

    # fim asks for support_size entries; mc keeps next_token_keep(support_size) of each next-token distribution
    return max(cfg.k, cfg.top_n, cfg.rescore_k, next_token_keep(support_size(cfg)))


def load_backend(backend: str, cfg: BuildConfig, folder: Path):
    """The teacher engine for ``backend`` ("hf" or "vllm")."""
    if backend == "vllm":
        from ar2mdm.precompute.vllm_backend import VllmTeacher

        return VllmTeacher.load(folder, cfg.engine, engine_max_logprobs(cfg), cfg.seed)
    return TorchTeacher.load(folder, cfg.device, cfg.dtype, cfg.tree_mask)


class Interrupted(UserError):
    """Ctrl-C during a build: the finished work is on disk; the message says what was kept."""


def size_threads(threads: int | None) -> int:
    """torch threads for this process: --threads, else OMP_NUM_THREADS, else the CPUs this process may use
    shared among the ranks of its node (LOCAL_WORLD_SIZE from torchrun, SLURM_NTASKS_PER_NODE from Slurm):
    processes that each take every core fight over them (4x slower seen on 2 cores)."""
    if threads is None and not os.environ.get("OMP_NUM_THREADS"):
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("SLURM_NTASKS_PER_NODE") or 1)
        threads = max(1, len(os.sched_getaffinity(0)) // max(1, local))
    if threads is not None:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def check_rank_files(out: Path, cfg: BuildConfig, files: list, corpus) -> None:
    """Record the sha256 of the names and contents of the files this rank reads (once per rank, its own bytes
    only), or check it against the earlier run's: the manifest's fingerprint covers names and sizes only."""
    digest = files_sha256(rank_share(files, cfg.rank, cfg.world_size).files, corpus)
    rec = out / rank_started_name(cfg.rank)
    if rec.exists() and rec.read_text().strip() != digest and finished_work(out):
        raise UserError(
            f"--out {out}: the corpus files of rank {cfg.rank} changed since its earlier run (same names "
            "and sizes, other contents); build into a new --out, or pass --fresh"
        )
    write_atomic(rec, digest.encode())


def open_out(plan: BuildPlan, out: Path) -> None:
    """Start or continue the build in ``out`` (this rank holds its lock): the manifest header or the check that
    the folder holds this build, the tokenizer the trainer reads, and the cleanup of a crashed run's files."""
    cfg = plan.cfg
    try:
        if cfg.fresh and out.exists():
            clear_build(out)
        prepare_out(out, plan.header, content_digest=lambda: files_sha256(plan.files, plan.corpus))
        if not (out / TOKENIZER_DIR).exists():  # the trainer reads the tokenizer from here, never the teacher
            tmp = out / f"{TOKENIZER_DIR}.tmp{os.getpid()}"
            plan.tokenizer.save_pretrained(tmp)
            try:
                os.replace(tmp, out / TOKENIZER_DIR)
            except OSError:  # another rank was first
                shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e}); choose another --out") from None
    for stale in out.glob(f"part-{cfg.rank:05d}-*.tmp*"):
        stale.unlink()  # a crashed run's partial write; its sequences are redone
    remove_stale_tmps(out)
    check_rank_files(out, cfg, plan.files, plan.corpus)


def run_build(cfg: BuildConfig, teacher=None) -> BuildSummary:
    """Run (or resume) a build; returns a summary. Raises UserError on bad input, `Interrupted` on Ctrl-C.

    ``teacher``: an engine already loaded (`TorchTeacher`/`VllmTeacher` for this teacher), to serve several
    builds from one engine start; by default the build loads its own and closes it at the end.
    """
    t0 = time.time()
    plan = plan_build(cfg)
    size_threads(cfg.threads)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot create it ({e.strerror or e}); choose another --out") from None
    with rank_lock(out, cfg.rank):
        open_out(plan, out)
        s = write_shards(plan, out, teacher)
        finish_rank(out, cfg.rank)  # every shard of this rank is on disk: its completion record
    s.seconds = time.time() - t0
    return s


def count_rows(plan: BuildPlan) -> int:
    """This rank's rows (sequences x masks per sequence), counted by streaming its share of the corpus once more
    (tokenizing only): the progress bar's total."""
    if plan.rows is not None:
        return plan.rows
    tokenizer = load_tokenizer(plan.folder)  # its own: a fast tokenizer is not to be shared between threads
    n = sum(1 for _ in rank_stream(plan.cfg, plan.files, tokenizer, CorpusStats(), PackStats()))
    return n * plan.cfg.masks_per_seq


class RowsBar:
    """The build's one bar, in rows of this rank, advancing within a teacher call as its positions are scored. Its
    total is counted beside the build (`count_rows`, on a thread of its own), so the count delays nothing."""

    def __init__(self, plan: BuildPlan):
        cfg = plan.cfg
        self.bar = tqdm(
            total=None,
            unit="row",
            desc=f"kdtargets rank {cfg.rank}",
            disable=not cfg.progress,
            file=sys.stderr,
            dynamic_ncols=True,
            smoothing=0.05,
            bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]",
        )
        self.total: int | None = None
        threading.Thread(target=self._count, args=(plan,), daemon=True).start()

    def _count(self, plan: BuildPlan) -> None:
        self.total = count_rows(plan)

    def advance(self, rows: float) -> None:
        if self.total is not None and self.bar.total is None:
            self.bar.total = self.total
        self.bar.update(rows)

    def note(self, line: str) -> None:
        self.bar.write(line, file=sys.stderr)

    def at_shard(self, u: int) -> None:
        self.bar.set_postfix_str(f"shard {u}")

    def finish(self) -> None:
        self.bar.n = self.bar.total = round(self.bar.n)  # (the count and the stream agree; this also ends a late count)
        self.bar.close()


class Engine:
    """The teacher, loaded at the first shard that needs it (a finished build never starts one), and the build's
    settings with ``auto`` batch sizes resolved against it (`autosize.resolve_auto`)."""

    def __init__(self, plan: BuildPlan, teacher, bar: RowsBar):
        self.plan, self.teacher, self.bar = plan, teacher, bar
        self.own = teacher is None  # loaded here, so closed here
        self.cfg: BuildConfig | None = None

    def ready(self):
        """(the teacher, the resolved settings)."""
        if self.cfg is None:
            plan = self.plan
            if self.teacher is None:
                self.teacher = load_backend(plan.backend, plan.cfg, plan.folder)
            self.cfg = plan.cfg
            if "auto" in (plan.cfg.batch_size, plan.cfg.token_budget):
                self.cfg, said = resolve_auto(plan.cfg, self.teacher)
                for line in said if plan.cfg.progress else ():
                    self.bar.note(line)
        return self.teacher, self.cfg

    def close(self) -> None:
        if self.own and self.teacher is not None:
            self.teacher.close()


@dataclass
class OpenShard:
    """The shard being computed: its parts so far, of which the first ``flushed`` are in its partial file (written
    every --flush-seconds and on Ctrl-C, read back by a resumed build)."""

    path: Path
    parts: list[ShardData]
    flushed: int
    start: int  # its sequences taken from an interrupted run's partial file

    @classmethod
    def resume(cls, path: Path, target: TargetPlan, masks_per_seq: int) -> "OpenShard":
        old = read_partial(path, target.example_ids)
        parts = [old] if old is not None else []
        return cls(path, parts, len(parts), old.rows // masks_per_seq if old is not None else 0)

    def flush(self) -> None:
        if len(self.parts) > self.flushed:
            write_partial(self.path, concat_shards(self.parts))
            self.flushed = len(self.parts)


def compute_shard(engine: Engine, shard: OpenShard, target: TargetPlan, n: int, bar: RowsBar) -> None:
    """The rest of a shard of ``n`` sequences, in teacher calls (`targets.build_rows`) of a whole shard for vLLM
    (its engine schedules it all at once), else --batch-size sequences, flushed every --flush-seconds."""
    teacher, cfg = engine.ready()
    chunk = n if teacher.whole_shard else cfg.batch_size
    last = time.time()
    for c in range(shard.start, n, chunk):
        part = target.sequences(c, min(n, c + chunk))
        per_position = len(part.example_ids) / max(part.scored, 1)
        shard.parts.append(build_rows(cfg, teacher, part, engine.plan.fim_ids, lambda k: bar.advance(k * per_position)))
        if c + chunk < n and time.time() - last >= cfg.flush_seconds:
            shard.flush()
            last = time.time()


def interrupted(out: Path, shard: OpenShard | None, masks_per_seq: int) -> Interrupted:
    """What Ctrl-C keeps: the finished shards and the shard in progress's computed sequences (its partial file)."""
    kept = ""
    if shard is not None and shard.parts:
        shard.flush()
        kept = f" and {sum(p.rows for p in shard.parts) // masks_per_seq} sequences of {shard.path.name}"
    done = finalize_manifest(out).shards
    return Interrupted(
        f"interrupted: {out} keeps {len(done)} finished shards ({sum(s.rows for s in done)} rows)"
        f"{kept}; rerun the same command to resume"
    )


def write_shards(plan: BuildPlan, out: Path, teacher=None) -> BuildSummary:
    """The shard loop: skip finished shards, resume a partial one, compute the rest (`compute_shard`), and keep
    what is done on Ctrl-C. Each shard is planned once (`BuildPlan.shard_plan`: its rows' masks and target
    positions), and the plan serves the teacher, the resumed rows' check and the progress."""
    cfg = plan.cfg
    writer = ShardWriter(out, cfg.format, cfg.logprob_dtype)
    bar = RowsBar(plan)
    engine = Engine(plan, teacher, bar)
    shard: OpenShard | None = None
    skipped = resumed = 0
    try:
        for u, a, ids, plen in shard_chunks(plan.stream, cfg.seqs_per_shard):
            path = out / shard_name(cfg.rank, u, cfg.format)
            if path.with_name(path.name + DONE_SUFFIX).exists() and path.exists():
                skipped += 1  # finished: its sequences were only re-tokenized to find the next
                bar.advance(len(ids) * cfg.masks_per_seq)
                continue
            bar.at_shard(u)
            target = plan.shard_plan(ids, plen, a)
            shard = OpenShard.resume(path, target, cfg.masks_per_seq)
            resumed += shard.start
            bar.advance(shard.start * cfg.masks_per_seq)
            compute_shard(engine, shard, target, len(ids), bar)
            writer.submit(path, shard.parts)  # written while the teacher computes the next shard
            shard = None
        writer.close()
        bar.finish()
        warn_skipped(plan.stats)
    except KeyboardInterrupt:
        writer.close()  # the shard in flight lands: it is kept
        raise interrupted(out, shard, cfg.masks_per_seq) from None
    finally:
        writer.pool.shutdown()  # after another error, the shard in flight still lands (shutdown waits for it)
        engine.close()
    return BuildSummary(
        out=str(out),
        shards_written=len(writer.done),
        shards_skipped=skipped,
        rows=sum(i.rows for i in writer.done),
        target_positions=sum(i.target_positions for i in writer.done),
        seconds=0.0,
        backend=plan.backend,
        resumed_sequences=resumed,
        empty_rank=plan.empty,
    )
