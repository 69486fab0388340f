"""Rows and their teacher targets for some sequences of a shard: masks, the teacher's calls, sparse entries.

`kdtargets build` (build.py) streams sequences and hands them here a batch at a time; a row's mask and the
randomness of its targets depend on (seed, example id) alone, so a resumed build computes the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.fim import fim_targets
from ar2mdm.precompute.sparsify import sparse_targets, support_size
from ar2mdm.precompute.topk import rescore
from ar2mdm.shared.masking import row_seed, sample_row_mask
from ar2mdm.shared.shards import ShardData, offsets_from_lengths


def draw_row_masks(cfg: BuildConfig, seq_index: np.ndarray, prompt_len: np.ndarray) -> "RowMasks":
    """The masks of the rows of the given sequences, --masks-per-seq rows each, drawn from (seed, example id)."""
    out = RowMasks([], [], [], [], [] if cfg.target_block_size is not None else None)
    for s, pl in zip(seq_index.tolist(), prompt_len.tolist()):
        for m in range(cfg.masks_per_seq):
            key = f"{cfg.rank:05d}-{s:08d}-m{m}"
            t, mask = sample_row_mask(
                pl, cfg.seq_len, cfg.seed, key, eps=cfg.mask_eps, block_size=cfg.target_block_size
            )
            out.example_ids.append(key)
            out.t.append(float(t.mean()) if out.block_t is not None else float(t[0]))
            out.masks.append(mask.nonzero()[:, 0].numpy().astype(np.int32))
            out.src.append(s)
            if out.block_t is not None:
                out.block_t.append(t.numpy())
    return out


@dataclass
class RowMasks:
    """Rows and their masks: per row its example id, mask ratio t, masked positions and sequence; with blocks,
    each block's t (t is then their mean)."""

    example_ids: list[str]
    t: list[float]
    masks: list[np.ndarray]
    src: list[int]
    block_t: list[np.ndarray] | None


def clean_context_targets(cfg: BuildConfig, teacher, plan: "TargetPlan", *, fim_ids=None, on_batch=None) -> list[dict]:
    """topk or fim targets at the positions each sequence of the plan scores on its clean row: per sequence a dict
    position -> (ids, logprobs). One teacher call per --batch-size sequences, or for all of them (a backend that
    schedules a whole shard, `whole_shard`)."""
    out = []
    step = len(plan.ids) if teacher.whole_shard else cfg.batch_size
    context = dict(window=cfg.right_window, block_size=cfg.target_block_size)
    for a in range(0, len(plan.ids), step):
        x = torch.as_tensor(plan.ids[a : a + step], dtype=torch.long)
        pos = [torch.as_tensor(p, dtype=torch.long) for p in plan.seq_positions[a : a + step]]
        if cfg.mode == "fim":
            res = fim_targets(
                teacher, x, pos, fim_ids, **context, top_n=support_size(cfg), token_budget=cfg.token_budget
            )
        else:
            res = rescore(teacher.scorer(cfg.token_budget), x, pos, k=cfg.k, **context)
        for (cand, logq), p, key in zip(res, pos, plan.seq_keys[a : a + step]):
            tid, tlp = sparse_targets(cfg, cand, logq, key)
            out.append({int(i): (tid[j], tlp[j]) for j, i in enumerate(p.tolist())})
        if on_batch:
            on_batch(sum(len(p) for p in pos))
    return out


def mc_targets_of(
    cfg: BuildConfig, teacher, xs: list[np.ndarray], masks: list[np.ndarray], keys: list[str], *, on_step=None
):
    """MC targets of some rows at their masked positions, one teacher call: per row (ids list, logprobs list,
    McTargets). ``on_step(n)``: as the teacher draws n more masked positions."""
    from ar2mdm.precompute.mc.particles import McSettings

    seeds = [row_seed(cfg.seed, key + ":mc") for key in keys]
    s = McSettings.of(cfg, support_size(cfg))
    res = teacher.mc_batch(xs, [m.tolist() for m in masks], seeds, s, block_size=cfg.target_block_size, on_step=on_step)
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
    """Some sequences, their rows (masks) and where the teacher works on them: made once per shard, and what
    `build_rows` computes, the progress bar counts and a resumed shard checks its saved rows against."""

    ids: np.ndarray  # (n, L) int32: the sequences
    plen: np.ndarray  # (n,) int32: their prompt lengths
    seq_keys: list[str]  # per sequence: the key of its targets' draws (topk/fim sparsify)
    rows: RowMasks  # the rows: their ids, masks and sequences (src: an index into ids)
    row_positions: list[np.ndarray]  # per row: its target positions
    # True where a row's targets depend on its mask (mc: each row its own teacher computation at its masked
    # positions); False where they are conditioned on the clean row (topk, fim), so the rows of a sequence share
    # one computation at seq_positions
    mask_dependent: bool
    seq_positions: list[np.ndarray] | None = None  # per sequence: the positions scored on its clean row

    @property
    def scored(self) -> int:
        """Positions the teacher scores."""
        return sum(len(p) for p in (self.row_positions if self.mask_dependent else self.seq_positions))

    @property
    def example_ids(self) -> list[str]:
        return self.rows.example_ids

    def sequences(self, a: int, b: int) -> "TargetPlan":
        """The plan of sequences a..b-1 and their rows (a teacher call's share of a shard)."""
        keep = [r for r, s in enumerate(self.rows.src) if a <= s < b]

        def pick(xs):
            return None if xs is None else [xs[r] for r in keep]

        rows = RowMasks(
            example_ids=pick(self.rows.example_ids),
            t=pick(self.rows.t),
            masks=pick(self.rows.masks),
            src=[self.rows.src[r] - a for r in keep],
            block_t=pick(self.rows.block_t),
        )
        return replace(
            self,
            ids=self.ids[a:b],
            plen=self.plen[a:b],
            seq_keys=self.seq_keys[a:b],
            rows=rows,
            row_positions=pick(self.row_positions),
            seq_positions=None if self.seq_positions is None else self.seq_positions[a:b],
        )


def target_plan(cfg: BuildConfig, ids: np.ndarray, plen: np.ndarray, seq_index: np.ndarray) -> TargetPlan:
    """The plan of the sequences ``ids`` (numbered ``seq_index`` in this rank's stream, prompt lengths ``plen``):
    their rows' masks, drawn from (seed, example id), and the target positions."""
    rows = draw_row_masks(cfg, seq_index, plen)
    local = {s: j for j, s in enumerate(seq_index.tolist())}
    rows.src = [local[s] for s in rows.src]
    keys = [f"{cfg.rank:05d}-{q:08d}" for q in seq_index.tolist()]
    plan = TargetPlan(ids=ids, plen=plen, seq_keys=keys, rows=rows, row_positions=rows.masks, mask_dependent=True)
    if cfg.mode == "mc":
        return plan
    # Targets are conditioned on the clean row, so the M masks of a sequence share one computation over the
    # union of their target positions.
    if cfg.positions == "all":
        per_seq = [np.arange(max(1, int(pl)), cfg.seq_len, dtype=np.int32) for pl in plen]
        return replace(plan, row_positions=[per_seq[s] for s in rows.src], mask_dependent=False, seq_positions=per_seq)
    per_seq = [np.zeros(0, np.int32) for _ in seq_index]
    for s, m in zip(rows.src, rows.masks):
        per_seq[s] = np.union1d(per_seq[s], m).astype(np.int32)
    return replace(plan, mask_dependent=False, seq_positions=per_seq)


def build_rows(cfg: BuildConfig, teacher, plan: TargetPlan, fim_ids=None, on_batch=None) -> ShardData:
    """All rows of a plan (part of a shard): teacher targets at its target positions, as ShardData. ``cfg`` has
    --batch-size and --token-budget resolved (`autosize.resolve_auto`).

    ``on_batch(n)``: called as the teacher scores n more positions (the progress bar)."""
    ids, masks, src, ex = plan.ids, plan.rows.masks, plan.rows.src, plan.example_ids
    tids, tlps = [], []
    mc = {}
    if cfg.mode == "mc":
        # mc targets depend on the mask: every row is its own computation, all rows in one teacher call
        # progress advances with every decode step (on_batch per step), not per finished batch
        res = []
        for i, lp, r in mc_targets_of(cfg, teacher, [ids[s] for s in src], masks, ex, on_step=on_batch):
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
        targets = clean_context_targets(cfg, teacher, plan, fim_ids=fim_ids, on_batch=on_batch)
        for s, pos in zip(src, plan.row_positions):
            tab = targets[s]
            for i in pos.tolist():
                tids.append(tab[i][0])
                tlps.append(tab[i][1])
    row_ids = np.stack([ids[s] for s in src]).astype(np.int32)
    return ShardData(
        example_ids=ex,
        input_ids=row_ids,
        prompt_len=np.asarray([plan.plen[s] for s in src], np.int32),
        t=np.asarray(plan.rows.t, np.float32),
        mask_offsets=offsets_from_lengths([len(m) for m in masks]),
        mask_positions=np.concatenate(masks).astype(np.int32),
        target_offsets=offsets_from_lengths([len(p) for p in plan.row_positions]),
        target_positions=np.concatenate(plan.row_positions).astype(np.int32),
        entry_offsets=offsets_from_lengths([len(x) for x in tids]),
        target_ids=np.concatenate(tids).astype(np.int32) if tids else np.zeros(0, np.int32),
        target_logprobs=np.concatenate(tlps).astype(np.float32) if tlps else np.zeros(0, np.float32),
        **mc,
        block_t=None if plan.rows.block_t is None else np.stack(plan.rows.block_t).astype(np.float32),
    )
