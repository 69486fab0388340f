"""Rows and their teacher targets for some sequences of a shard: masks, the teacher's calls, sparse entries.

`kdtargets build` (build.py) streams sequences and hands them here a batch at a time; a row's mask and the
randomness of its targets depend on (seed, example id) alone, so a resumed build computes the same rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.sparsify import sparse_targets, support_size
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


def clean_context_targets(
    cfg: BuildConfig,
    teacher,
    ids: np.ndarray,
    positions: list[np.ndarray],
    keys: list[str],
    *,
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
            res = teacher.fim_targets(
                x, pos, fim_ids, window=cfg.window, top_n=support_size(cfg), token_budget=cfg.token_budget
            )
        else:
            res = teacher.rescore_targets(x, pos, cfg.k, cfg.window, cfg.token_budget)
        for (cand, logq), p, key in zip(res, pos, keys[a : a + step]):
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
    """Some sequences, their rows (masks) and where the teacher works on them: made once per shard, and what
    `build_rows` computes, the progress bar counts and a resumed shard checks its saved rows against."""

    ids: np.ndarray  # (n, L) int32: the sequences
    plen: np.ndarray  # (n,) int32: their prompt lengths
    seq_keys: list[str]  # per sequence: the key of its targets' draws (topk/fim sparsify)
    example_ids: list[str]  # per row
    t: np.ndarray  # (R,) float32: each row's mask ratio
    masks: list[np.ndarray]  # per row: its masked positions
    src: list[int]  # per row: its sequence (an index into ids)
    row_positions: list[np.ndarray]  # per row: its target positions
    seq_positions: list[np.ndarray] | None  # per sequence (topk/fim): the positions scored; None in mc (per row)

    @property
    def scored(self) -> int:
        """Positions the teacher scores."""
        return sum(len(p) for p in (self.row_positions if self.seq_positions is None else self.seq_positions))

    def sequences(self, a: int, b: int) -> "TargetPlan":
        """The plan of sequences a..b-1 and their rows (a teacher call's share of a shard)."""
        rows = [r for r, s in enumerate(self.src) if a <= s < b]
        pick = lambda xs: [xs[r] for r in rows]  # noqa: E731
        return TargetPlan(
            self.ids[a:b],
            self.plen[a:b],
            self.seq_keys[a:b],
            pick(self.example_ids),
            self.t[rows],
            pick(self.masks),
            [self.src[r] - a for r in rows],
            pick(self.row_positions),
            None if self.seq_positions is None else self.seq_positions[a:b],
        )


def target_plan(cfg: BuildConfig, ids: np.ndarray, plen: np.ndarray, seq_index: np.ndarray) -> TargetPlan:
    """The plan of the sequences ``ids`` (numbered ``seq_index`` in this rank's stream, prompt lengths ``plen``):
    their rows' masks, drawn from (seed, example id), and the target positions."""
    ex, ts, masks, src = row_masks(cfg, seq_index, plen)
    local = {s: j for j, s in enumerate(seq_index.tolist())}
    src = [local[s] for s in src]
    keys = [f"{cfg.rank:05d}-{q:08d}" for q in seq_index.tolist()]
    if cfg.mode == "mc":
        return TargetPlan(ids, plen, keys, ex, ts, masks, src, masks, None)
    # Targets are conditioned on the clean row, so the M masks of a sequence share one computation over the
    # union of their target positions.
    if cfg.positions == "all":
        per_seq = [np.arange(max(1, int(pl)), cfg.seq_len, dtype=np.int32) for pl in plen]
        return TargetPlan(ids, plen, keys, ex, ts, masks, src, [per_seq[s] for s in src], per_seq)
    per_seq = [np.zeros(0, np.int32) for _ in seq_index]
    for s, m in zip(src, masks):
        per_seq[s] = np.union1d(per_seq[s], m).astype(np.int32)
    return TargetPlan(ids, plen, keys, ex, ts, masks, src, masks, per_seq)


def build_rows(cfg: BuildConfig, teacher, plan: TargetPlan, fim_ids=None, on_batch=None) -> ShardData:
    """All rows of a plan (part of a shard): teacher targets at its target positions, as ShardData. ``cfg`` has
    --batch-size and --token-budget resolved (`autosize.resolve_auto`).

    ``on_batch(n)``: called as the teacher scores n more positions (the progress bar)."""
    ids, masks, src, ex = plan.ids, plan.masks, plan.src, plan.example_ids
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
        targets = clean_context_targets(
            cfg, teacher, ids, plan.seq_positions, plan.seq_keys, fim_ids=fim_ids, on_batch=on_batch
        )
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
