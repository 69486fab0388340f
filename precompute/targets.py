"""Rows and their teacher targets for some sequences of a shard: masks, the teacher's calls, sparse entries.

`kdtargets build` (build.py) streams sequences and hands them here a batch at a time; a row's mask and the
randomness of its targets depend on (seed, example id) alone, so a resumed build computes the same rows.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch

from ar2mdm.precompute.config import CUDA_TOKEN_BUDGET, DEFAULT_BATCH, DEFAULT_TOKEN_BUDGET, BuildConfig
from ar2mdm.precompute.teacher import text_config
from ar2mdm.shared.masking import row_seed, sample_row_mask
from ar2mdm.shared.shards import ShardData, offsets_from_lengths


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


def sparse_targets(cfg: BuildConfig, cand: torch.Tensor, logq: torch.Tensor, key: str):
    """Per position of (cand, logq) (P, C): the stored entries, top-N or (``--sparsify sample``) RS-KD draws
    seeded by ``key`` (a sequence or row id), so a resumed build draws the same."""
    if cfg.sparsify == "topn":
        return select_top_n(cand, logq, cfg.top_n)
    from ar2mdm.precompute.sparsify import sample_sparse

    g = torch.Generator().manual_seed(row_seed(cfg.seed, key + ":sample"))
    out = [sample_sparse(cand[p], logq[p], cfg.samples, g) for p in range(cand.shape[0])]
    return [i for i, _ in out], [lp for _, lp in out]


def support_size(cfg: BuildConfig) -> int:
    """Entries a mode hands over per position: top_n, or a wider support to sample from."""
    from ar2mdm.precompute.particles import next_token_keep

    return cfg.top_n if cfg.sparsify == "topn" else next_token_keep(cfg.top_n)


def auto_batch_size(cfg: BuildConfig, teacher) -> tuple[int, str]:
    """--batch-size (sequences) when not given, and why: 8, or for mc on CUDA the most whose rows' particles fit
    in 80% of the free GPU memory (`particles.bytes_per_row`), at most a shard's sequences."""
    if cfg.mode != "mc" or not str(teacher.device).startswith("cuda"):
        return DEFAULT_BATCH, "the default"
    from ar2mdm.precompute.particles import bytes_per_row, next_token_keep

    free, _ = torch.cuda.mem_get_info()
    model = teacher.model
    elt = next(model.parameters()).element_size()
    per_row = bytes_per_row(model.config, cfg.seq_len, cfg.k, next_token_keep(support_size(cfg)), elt)
    seqs = max(1, min(cfg.seqs_per_shard, int(0.8 * free) // (per_row * cfg.masks_per_seq)))
    return seqs, f"auto: {per_row / 2**20:.0f} MiB per row, {free / 2**30:.1f} GiB free"


def auto_token_budget(cfg: BuildConfig, teacher) -> tuple[int, str]:
    """--token-budget when not given, and why: 4096, or on CUDA 65536 where half the free memory holds a forward
    of that many tokens (each: the layer's activations and its row of the 1,024-token tree mask)."""
    if not str(teacher.device).startswith("cuda"):
        return DEFAULT_TOKEN_BUDGET, "the default"
    free, _ = torch.cuda.mem_get_info()
    c = text_config(teacher.model.config)
    elt = next(teacher.model.parameters()).element_size()
    per_token = (4 * c.hidden_size + 3 * c.intermediate_size) * elt + 2 * 1024
    budget = max(DEFAULT_TOKEN_BUDGET, min(CUDA_TOKEN_BUDGET, int(0.5 * free) // per_token))
    return budget, f"auto: {free / 2**30:.1f} GiB free"


def resolve_auto(cfg: BuildConfig, teacher) -> tuple[BuildConfig, list[str]]:
    """``cfg`` with --batch-size and --token-budget chosen for this teacher where they were not given, and a line
    for each choice that is not the plain default."""
    said = []
    for name, choose in (("batch_size", auto_batch_size), ("token_budget", auto_token_budget)):
        if getattr(cfg, name) is None:  # (vLLM's device is "vllm": the defaults, which it does not use)
            n, why = choose(cfg, teacher)
            cfg = dataclasses.replace(cfg, **{name: n})
            if why != "the default":
                said.append(f"--{name.replace('_', '-')} {n} ({why})")
    return cfg, said


def clean_context_targets(
    cfg: BuildConfig,
    teacher,
    ids: np.ndarray,
    positions: list[np.ndarray],
    keys: list[str],
    fim_ids=None,
    on_batch=None,
) -> list[dict]:
    """topk or fim targets for whole sequences: per sequence a dict position -> (ids, logprobs). One teacher call
    per --batch-size sequences, or for all of them (a backend that schedules a whole shard, `whole_shard`)."""
    out = []
    step = len(ids) if teacher.whole_shard else cfg.batch_size
    for a in range(0, len(ids), step):
        x, pos = ids[a : a + step], positions[a : a + step]
        if cfg.mode == "fim":
            res = teacher.fim_targets(x, pos, fim_ids, cfg.window, support_size(cfg), cfg.token_budget)
        else:
            res = teacher.rescore_targets(x, pos, cfg.k, cfg.window, cfg.token_budget)
        for (cand, logq), p, key in zip(res, pos, keys[a : a + step]):
            tid, tlp = sparse_targets(cfg, cand, logq, key)
            out.append({int(i): (tid[j], tlp[j]) for j, i in enumerate(p.tolist())})
        if on_batch:
            on_batch(sum(len(p) for p in pos))
    return out


def mc_targets_of(
    cfg: BuildConfig, teacher, xs: list[np.ndarray], masks: list[np.ndarray], keys: list[str], on_step=None
):
    """MC targets of some rows at their masked positions, one teacher call: per row (ids list, logprobs list,
    McTargets). ``on_step(n)``: as the teacher draws n more masked positions."""
    from ar2mdm.precompute.particles import McSettings

    seeds = [row_seed(cfg.seed, key + ":mc") for key in keys]
    res = teacher.mc_batch(xs, [m.tolist() for m in masks], seeds, McSettings.of(cfg, support_size(cfg)), on_step)
    out = []
    for r, key in zip(res, keys):
        if cfg.sparsify == "sample":
            from torch.nn.utils.rnn import pad_sequence

            cand = pad_sequence([i.long() for i in r.ids], batch_first=True)  # (P, C)
            logq = pad_sequence([lp.double() for lp in r.logprobs], batch_first=True, padding_value=-math.inf)
            out.append((*sparse_targets(cfg, cand, logq, key), r))
        else:
            out.append(
                (
                    [np.asarray(i).astype(np.int32) for i in r.ids],
                    [np.asarray(lp, dtype=np.float32) for lp in r.logprobs],
                    r,
                )
            )
    return out


@dataclass
class TargetPlan:
    """The rows of some sequences and where the teacher works on them."""

    example_ids: list[str]  # per row
    t: np.ndarray  # (R,) float32: each row's mask ratio
    masks: list[np.ndarray]  # per row: its masked positions
    src: list[int]  # per row: the index of its sequence
    row_positions: list[np.ndarray]  # per row: its target positions
    seq_positions: list[np.ndarray] | None  # per sequence (topk/fim): the positions scored; None in mc (per row)

    @property
    def scored(self) -> int:
        """Positions the teacher scores (the progress bar's unit: a steady ETA)."""
        return sum(len(p) for p in (self.row_positions if self.seq_positions is None else self.seq_positions))


def target_plan(cfg: BuildConfig, plen: np.ndarray, seq_index: np.ndarray) -> TargetPlan:
    """The rows of the sequences ``seq_index`` (prompt lengths ``plen``), their masks and target positions."""
    ex, ts, masks, src = row_masks(cfg, seq_index, plen)
    local = {s: j for j, s in enumerate(seq_index.tolist())}
    if cfg.mode == "mc":
        return TargetPlan(ex, ts, masks, src, masks, None)
    # Targets are conditioned on the clean row, so the M masks of a sequence share one computation over the
    # union of their target positions.
    if cfg.positions == "all":
        per_seq = [np.arange(max(1, int(pl)), cfg.seq_len, dtype=np.int32) for pl in plen]
        return TargetPlan(ex, ts, masks, src, [per_seq[local[s]] for s in src], per_seq)
    per_seq = [np.zeros(0, np.int32) for _ in seq_index]
    for s, m in zip(src, masks):
        per_seq[local[s]] = np.union1d(per_seq[local[s]], m).astype(np.int32)
    return TargetPlan(ex, ts, masks, src, masks, per_seq)


def planned_positions(cfg: BuildConfig, plen: np.ndarray, seq_index: np.ndarray) -> int:
    """Positions the teacher will score for these sequences."""
    return target_plan(cfg, plen, seq_index).scored


def build_rows(
    cfg: BuildConfig, teacher, ids: np.ndarray, plen: np.ndarray, seq_index: np.ndarray, fim_ids=None, on_batch=None
) -> ShardData:
    """All rows of some sequences (part of a shard): masks for every sequence, teacher targets, as ShardData.

    ``on_batch(n)``: called after each teacher call with the n positions it scored (the progress bar)."""
    cfg, _ = resolve_auto(cfg, teacher)  # (done once by the build; here for callers that did not)
    plan = target_plan(cfg, plen, seq_index)
    ex, masks, src = plan.example_ids, plan.masks, plan.src
    local = {s: j for j, s in enumerate(seq_index.tolist())}
    tids, tlps = [], []
    mc = {}
    if cfg.mode == "mc":
        # mc targets depend on the mask: every row is its own computation, all rows in one teacher call
        # progress advances with every decode step (on_batch per step), not per finished batch
        res = []
        for i, lp, r in mc_targets_of(cfg, teacher, [ids[local[s]] for s in src], masks, ex, on_batch):
            tids += i
            tlps += lp
            res.append(r)
        mc = dict(
            mc_samples=np.full(len(ex), cfg.k, np.int32),
            mc_ess=np.asarray([r.ess for r in res], np.float32),
            mc_resamples=np.asarray([len(r.ess_before) for r in res], np.int32),
            mc_resample_ess=np.asarray([np.mean(r.ess_before) if r.ess_before else np.nan for r in res], np.float32),
        )
    else:
        keys = [f"{cfg.rank:05d}-{q:08d}" for q in seq_index.tolist()]
        targets = clean_context_targets(cfg, teacher, ids, plan.seq_positions, keys, fim_ids, on_batch)
        for s, pos in zip(src, plan.row_positions):
            tab = targets[local[s]]
            for i in pos.tolist():
                tids.append(tab[i][0])
                tlps.append(tab[i][1])
    row_ids = np.stack([ids[local[s]] for s in src]).astype(np.int32)
    return ShardData(
        example_ids=ex,
        input_ids=row_ids,
        prompt_len=np.asarray([plen[local[s]] for s in src], np.int32),
        t=plan.t,
        mask_offsets=offsets_from_lengths([len(m) for m in masks]),
        mask_positions=np.concatenate(masks).astype(np.int32),
        target_offsets=offsets_from_lengths([len(p) for p in plan.row_positions]),
        target_positions=np.concatenate(plan.row_positions).astype(np.int32),
        entry_offsets=offsets_from_lengths([len(x) for x in tids]),
        target_ids=np.concatenate(tids).astype(np.int32) if tids else np.zeros(0, np.int32),
        target_logprobs=np.concatenate(tlps).astype(np.float32) if tlps else np.zeros(0, np.float32),
        **mc,
    )
