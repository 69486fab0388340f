"""Checking and summarising a shard folder (`kdtargets validate` / `kdtargets inspect`; the trainer checks too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ar2mdm.schemas import Manifest, SchemaError
from ar2mdm.schemas.manifest import TOKENIZER_DIR
from ar2mdm.shared.blocks import describe
from ar2mdm.shared.digest import file_sha256
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.shards import DONE_SUFFIX, FORMATS, ShardData, rank_started_name, read_shard

SUM_TOLERANCE = 1e-3  # float16 storage rounds log-probs down, float32 sums carry rounding noise


class ValidationError(ValueError):
    """The first problem found in a shard folder, as one line."""


@dataclass
class WorldStatus:
    """Which ranks of a build's world have finished, from their completion records in the manifest."""

    world_size: int
    recorded: bool  # False: built by an ar2mdm older than the rank records (completion known from shards only)
    finished: list[int] = field(default_factory=list)
    unfinished: dict[int, int] = field(default_factory=dict)  # started, no record: rank -> finished shards so far
    never_started: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.unfinished and not self.never_started

    @property
    def missing(self) -> list[int]:
        return sorted([*self.unfinished, *self.never_started])

    def describe(self) -> str:
        """``2 of 3 finished (rank 1 in progress or stopped: 4 shards so far; rank 2 never started)``."""
        if not self.recorded:
            return f"{self.world_size} (completion not recorded: built by an earlier ar2mdm)"
        parts = [
            f"rank {r} in progress or stopped: {self.unfinished[r]} shards so far"
            if r in self.unfinished
            else f"rank {r} never started"
            for r in self.missing
        ]
        more = f"; and {len(parts) - 6} more" if len(parts) > 6 else ""
        detail = f" ({'; '.join(parts[:6])}{more})" if parts else ""
        return f"{len(self.finished)} of {self.world_size} finished{detail}"


def world_status(directory: Path, manifest: Manifest) -> WorldStatus:
    """The world's completion: a rank is finished with its record, started once its corpus digest or a shard of
    it is in ``directory``, and else never started."""
    if manifest.ranks is None:
        return WorldStatus(manifest.world_size, recorded=False, finished=list(range(manifest.world_size)))
    st = WorldStatus(manifest.world_size, recorded=True, finished=sorted(r.rank for r in manifest.ranks))
    for r in manifest.missing_ranks():
        prefix = f"part-{r:05d}-"
        if (directory / rank_started_name(r)).exists() or any(directory.glob(prefix + "*")):
            st.unfinished[r] = sum(s.file.startswith(prefix) for s in manifest.shards)
        else:
            st.never_started.append(r)
    return st


def partial_world_line(directory: Path, manifest: Manifest) -> str | None:
    """One line for a build whose world is not finished (None when it is): what is there and what is missing."""
    st = world_status(directory, manifest)
    if st.complete:
        return None
    rows = sum(s.rows for s in manifest.shards)
    return (
        f"{directory} is a partial build: ranks {st.describe()}; {rows} rows in {len(manifest.shards)} finished "
        "shards so far (rerun the missing ranks' commands to finish it)"
    )


def check_shard_data(data: ShardData, manifest: Manifest, where: str) -> None:
    """Content checks of one shard against its manifest: ids, positions, log-probs, sums."""
    L, V = manifest.seq_len, manifest.tokenizer.vocab_size
    top_n = manifest.params.get("top_n")
    if data.input_ids.shape != (data.rows, L):
        raise ValidationError(f"{where}: input_ids have shape {data.input_ids.shape}, expected ({data.rows}, {L})")
    for name, arr in (("input_ids", data.input_ids), ("target_ids", data.target_ids)):
        if arr.size and (arr.min() < 0 or arr.max() >= V):
            raise ValidationError(f"{where}: {name} outside [0, {V}) (min {arr.min()}, max {arr.max()})")
    lp = data.target_logprobs.astype(np.float64)
    if lp.size and not np.all(lp <= 0):
        raise ValidationError(f"{where}: a target log-prob is > 0 (max {lp.max()})")
    counts = np.diff(data.entry_offsets)
    if counts.size and (counts.min() < 1 or (top_n and counts.max() > top_n)):
        raise ValidationError(
            f"{where}: a target position holds {counts.min()}..{counts.max()} entries, expected 1..{top_n}"
        )
    if counts.size:
        sums = np.add.reduceat(np.exp(lp), data.entry_offsets[:-1])
        if sums.max() > 1 + SUM_TOLERANCE:
            raise ValidationError(f"{where}: target probabilities sum to {sums.max():.6f} > 1 at some position")
    for r in range(data.rows):
        lo = max(1, int(data.prompt_len[r]))
        m = data.row_masks(r)
        tp = data.target_positions[data.target_offsets[r] : data.target_offsets[r + 1]]
        ex = data.example_ids[r]
        if len(m) == 0:
            raise ValidationError(f"{where}: row {ex} has no masked position")
        if np.any(np.diff(m) <= 0) or m[0] < lo or m[-1] >= L:
            raise ValidationError(f"{where}: row {ex} has mask positions not ascending within [{lo}, {L})")
        if np.any(np.diff(tp) <= 0) or (len(tp) and (tp[0] < lo or tp[-1] >= L)):
            raise ValidationError(f"{where}: row {ex} has target positions not ascending within [{lo}, {L})")
        if not np.isin(m, tp).all():
            raise ValidationError(f"{where}: row {ex} has masked positions without a target")


def validate_dir(directory: str | Path) -> Manifest:
    """Check a shard folder completely; raise ValidationError with the first problem, else return its manifest."""
    d = Path(directory)
    if not d.exists():
        raise ValidationError(f"{d} does not exist")
    try:
        manifest = Manifest.load(d)
    except SchemaError as e:
        raise ValidationError(str(e)) from e
    if manifest.format not in FORMATS:
        raise ValidationError(f"{d}: manifest names unknown format {manifest.format!r}")
    listed = {s.file for s in manifest.shards}
    if not listed:
        world = world_status(d, manifest)
        if world.recorded and world.complete:
            raise ValidationError(f"{d}: every rank finished without a row (the corpus gave no full row of --seq-len)")
        raise ValidationError(
            partial_world_line(d, manifest) or f"{d}: the manifest lists no shards (build not run or not finished)"
        )
    on_disk = {p.name for p in d.glob("part-*") if p.suffix in FORMATS.values()}
    extra = sorted(on_disk - listed)
    if extra:
        raise ValidationError(f"{d}: shard {extra[0]} is not in the manifest (unfinished build? rerun it to finish)")
    tok = d / TOKENIZER_DIR
    if tok.exists():
        from transformers import AutoTokenizer

        from ar2mdm.shared.tokenizer import tokenizer_hash

        if tokenizer_hash(AutoTokenizer.from_pretrained(tok)) != manifest.tokenizer.sha256:
            raise ValidationError(f"{tok}: tokenizer hash differs from the manifest's")
    for info in manifest.shards:
        p = d / info.file
        if not p.exists():
            raise ValidationError(f"{p}: listed in the manifest but missing")
        if not (d / (info.file + DONE_SUFFIX)).exists():
            raise ValidationError(f"{p}: no completion marker")
        if file_sha256(p) != info.sha256:
            raise ValidationError(f"{p}: sha256 differs from the manifest's (file changed or corrupt)")
        try:
            data = read_shard(p)
        except SchemaError as e:
            raise ValidationError(str(e)) from e
        if data.rows != info.rows or data.num_targets != info.target_positions:
            raise ValidationError(
                f"{p}: {data.rows} rows / {data.num_targets} target positions, manifest says {info.rows} / "
                f"{info.target_positions}"
            )
        check_shard_data(data, manifest, str(p))
    partial = partial_world_line(d, manifest)  # last: the shards there are all checked first
    if partial:
        raise ValidationError(f"{partial}; every listed shard is valid")
    return manifest


def summarize_dir(directory: str | Path) -> dict:
    """Readable statistics of a shard folder (reads every shard)."""
    d = Path(directory)
    if not d.exists():
        raise UserError(f"{d} does not exist")
    manifest = Manifest.load(d)
    rows = positions = 0
    ent_sum = true_sum = mass_sum = support_sum = 0.0
    ess, resamples, resample_ess = [], [], []
    for info in manifest.shards:
        data = read_shard(d / info.file)
        rows += data.rows
        positions += data.num_targets
        lp = data.target_logprobs.astype(np.float64)
        p = np.exp(lp)
        starts = data.entry_offsets[:-1]
        if len(starts):
            ent_sum += float(np.add.reduceat(-p * lp, starts).sum())
            mass_sum += float(np.add.reduceat(p, starts).sum())
            support_sum += float(np.diff(data.entry_offsets).sum())
        row_of = np.repeat(np.arange(data.rows), np.diff(data.target_offsets))
        true_tok = data.input_ids[row_of, data.target_positions]  # (P,)
        entry_pos = np.repeat(np.arange(data.num_targets), np.diff(data.entry_offsets))
        hit = data.target_ids == true_tok[entry_pos]
        true_sum += float(p[hit].sum())
        if data.mc_ess is not None:
            ess.extend(data.mc_ess.tolist())
        if data.mc_resamples is not None:
            resamples.extend(data.mc_resamples.tolist())
            resample_ess.extend(data.mc_resample_ess.tolist())
    total_bytes = sum(s.bytes for s in manifest.shards)
    unfinished = [p.name for p in d.glob("part-*.partial")] + [
        p.name
        for p in d.glob("part-*")
        if p.suffix in FORMATS.values() and p.name not in {s.file for s in manifest.shards}
    ]
    world = world_status(d, manifest)
    if unfinished or not world.complete:
        status = (
            f"unfinished ({len(unfinished)} shard(s) in progress, {len(world.missing)} rank(s) not finished; "
            "rerun the build to finish)"
        )
    else:
        status = "finished" if manifest.shards or world.recorded else "unfinished (no shards; run the build)"
    summary = {
        "folder": str(d),
        "status": status,
        "ranks": world.describe(),
        "mode": manifest.mode,
        "task": manifest.task,
        "teacher": f"{manifest.teacher.architecture} {manifest.teacher.path} (sha256 "
        f"{manifest.teacher.weights_sha256[:12]})",
        "format": manifest.format,
        "shards": len(manifest.shards),
        "rows": rows,
        "target_positions": positions,
        "seq_len": manifest.seq_len,
        # the student these targets are for: a block student's block size (rows cut into blocks), or one block a row
        "block_size": manifest.block_size or manifest.seq_len,
        "student": describe(manifest.block_size),
        "mean_support": support_sum / max(positions, 1),
        "mean_stored_mass": mass_sum / max(positions, 1),
        "mean_target_entropy_nats": ent_sum / max(positions, 1),
        "mean_true_token_prob": true_sum / max(positions, 1),
        "bytes": total_bytes,
        "bytes_per_target_position": total_bytes / max(positions, 1),
        "params": manifest.params,
    }
    if ess:
        summary["mean_mc_ess"] = float(np.mean(ess))  # of the final weights (K for uniform)
    if resamples:
        n = np.asarray(resamples, np.float64)
        summary["mean_mc_resamples_per_row"] = float(n.mean())
        if n.sum() > 0:  # the mean ESS over every resampling, just before it
            summary["mean_mc_ess_before_resampling"] = float(np.nansum(np.asarray(resample_ess) * n) / n.sum())
    return summary
