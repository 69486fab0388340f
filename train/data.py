"""Streaming shard rows into training batches: split across ranks and workers, shuffled, epoch after epoch.

Memory stays flat: shards are read a record batch at a time, and only a shuffle buffer of rows is held.
The stream is infinite (epoch 0, then epoch 1, ...); the trainer counts the batches it consumed, and `--resume`
skips exactly those (per DataLoader worker), so a resumed run sees the same batches as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ar2mdm.schemas import Manifest, SchemaError
from ar2mdm.schemas.manifest import TOKENIZER_DIR
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.masking import sample_row_mask
from ar2mdm.shared.shards import check_shard_file, iter_shard_batches
from ar2mdm.shared.split import share_of
from ar2mdm.shared.validate import partial_world_line


@dataclass
class Row:
    example_id: str
    input_ids: np.ndarray  # (L,) int32
    prompt_len: int
    t: float
    mask_positions: np.ndarray  # (M,) int32 ascending
    target_positions: np.ndarray  # (P,) int32 ascending
    entry_offsets: np.ndarray  # (P+1,) int64, into target_ids/target_logprobs
    target_ids: np.ndarray  # (E,) int32
    target_logprobs: np.ndarray  # (E,) float32
    truth: bool = True  # its masked positions hold the truth (False: a student's state, whose targets are all)
    block_t: np.ndarray | None = None  # (nb,) float32: each block's mask ratio (None: one block, of ratio t)


@dataclass(frozen=True)
class TargetSpec:
    """What the trainer needs to know about the shards' targets, from their manifest."""

    top_n: int  # entries kept per position
    eos_id: int  # SFT padding: the student learns EOS there
    logprob_dtype: str  # storage precision of the log-probs ("float16" | "float32")
    exact_support: bool  # the stored entries are the whole target (topk with top_n >= K+1): no tail
    sampled: bool = False  # RS-KD sampled targets: unbiased for q at T = 1 only
    states: bool = False  # some rows are a student's states (no truth at their masked positions): KD alone there
    block_size: int | None = None  # targets for a block student of this block size (None: full attention)

    @classmethod
    def from_manifest(cls, manifest: Manifest) -> "TargetSpec":
        p = manifest.params
        top_n = int(p.get("top_n", 16))
        sampled = p.get("sparsify") == "sample"  # RS-KD: up to `samples` distinct draws per position
        # topk's K+1 candidates are its whole target: top-N of all of them, or draws from all of them, sum to 1
        exact = manifest.mode == "topk" and (top_n >= int(p.get("k", 0)) + 1 or sampled)
        width = max(top_n, int(p.get("draws", p.get("samples", 0)))) if sampled else top_n  # ("samples": older builds)
        return cls(
            top_n=width,
            eos_id=int(manifest.tokenizer.eos_id),
            logprob_dtype=str(p.get("logprob_dtype", "float16")),
            exact_support=exact,
            sampled=sampled,
            states=manifest.states is not None,
            block_size=manifest.block_size,
        )


def sft_padding_start(input_ids: np.ndarray, prompt_len: int, eos_id: int) -> int:
    """First padding position of an SFT row ``[BOS, prompt, response, EOS, EOS...]`` (len(row) if none).

    The first EOS of the trailing run ends the response (a real target: the teacher predicts the end); the
    EOS after it are padding, which the AR teacher never saw. Pretrain rows (prompt_len 0) have none.
    """
    L = len(input_ids)
    if prompt_len <= 0 or input_ids[-1] != eos_id:
        return L
    not_eos = np.flatnonzero(input_ids != eos_id)
    run = int(not_eos[-1]) + 1 if len(not_eos) else 0  # start of the trailing EOS run
    return max(run + 1, prompt_len)


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, L) long, the clean rows
    mask: torch.Tensor  # (B, L) bool
    prompt_len: torch.Tensor  # (B,) long
    target_ids: torch.Tensor  # (M, N) long, M = mask.sum(), in mask.nonzero() order
    target_logprobs: torch.Tensor  # (M, N) float32, -inf on padding
    # (M,) long b·L + i of each masked position, in mask.nonzero() order: made on the host, so that gathering
    # the masked positions on the device needs no nonzero() (a host sync per step)
    positions: torch.Tensor
    truth: torch.Tensor  # (B,) bool: the row's masked positions hold the truth (False: a student's state)
    block_t: torch.Tensor  # (B, nb) float32: each block's mask ratio (nb = 1 for whole rows: the row's t)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        return Batch(**{f: getattr(self, f).to(device, non_blocking=non_blocking) for f in self.__dataclass_fields__})

    def pin_memory(self) -> "Batch":
        """Page-locked copies, called by the DataLoader's pin_memory=True (it leaves a dataclass without this
        method unpinned, and a non_blocking copy from pageable memory blocks after all)."""
        return Batch(**{f: getattr(self, f).pin_memory() for f in self.__dataclass_fields__})


def rows_of_shard(path: Path, truth: bool = True) -> Iterator[Row]:
    """The rows of one shard file; ``truth``: False for a build on a student's states (its manifest's `states`)."""
    for data in iter_shard_batches(path):
        lp = data.target_logprobs.astype(np.float32)
        for r in range(data.rows):
            a, b = data.target_offsets[r], data.target_offsets[r + 1]
            e0, e1 = data.entry_offsets[a], data.entry_offsets[b]
            yield Row(
                example_id=data.example_ids[r],
                input_ids=data.input_ids[r],
                prompt_len=int(data.prompt_len[r]),
                t=float(data.t[r]),
                mask_positions=data.row_masks(r),
                target_positions=data.target_positions[a:b],
                entry_offsets=data.entry_offsets[a : b + 1] - e0,
                target_ids=data.target_ids[e0:e1],
                target_logprobs=lp[e0:e1],
                truth=truth,
                block_t=None if data.block_t is None else data.block_t[r],
            )


class RowStream:
    """Rows of a shard folder for one (rank, worker), shuffled through a buffer, epoch after epoch.

    Split by `shared.split` (whole shards per consumer where there are enough, else rows ``[consumer::consumers]``):
    no row is seen twice in an epoch.
    """

    def __init__(
        self,
        directory: Path,
        manifest: Manifest,
        consumer: int,
        consumers: int,
        seed: int,
        *,
        shuffle_buffer: int = 1024,
        resample_masks: bool = False,
        mask_eps: float = 1e-3,
    ):
        self.files = [directory / s.file for s in manifest.shards]
        self.truth = manifest.states is None
        self.consumer, self.consumers = consumer, consumers
        self.seed, self.buffer = seed, shuffle_buffer
        self.resample = resample_masks
        self.seq_len, self.mask_eps = manifest.seq_len, mask_eps
        self.block_size = manifest.block_size

    def rows_per_epoch(self, manifest: Manifest) -> int:
        share = share_of(manifest.shards, self.consumer, self.consumers)
        if not share.by_record:
            return sum(s.rows for s in share.files)
        total = sum(s.rows for s in manifest.shards)
        return len(range(self.consumer, total, self.consumers))

    def _epoch_rows(self, epoch: int) -> Iterator[Row]:
        order = list(range(len(self.files)))
        random.Random(f"{self.seed}:{epoch}").shuffle(order)  # the same order on every consumer
        share = share_of([self.files[j] for j in order], self.consumer, self.consumers)
        n = 0
        for f in share.files:
            for row in rows_of_shard(f, self.truth):
                n += 1
                if share.keeps(n - 1):
                    yield row

    def __iter__(self) -> Iterator[tuple[int, Row]]:
        """(epoch, row) pairs forever."""
        epoch = 0
        while True:
            rng = random.Random(f"{self.seed}:{epoch}:{self.consumer}")
            buf: list[Row] = []
            for row in self._epoch_rows(epoch):
                if len(buf) < self.buffer:
                    buf.append(row)
                    continue
                j = rng.randrange(len(buf))
                buf[j], row = row, buf[j]
                yield epoch, self._maybe_resample(row, epoch)
            rng.shuffle(buf)
            for row in buf:
                yield epoch, self._maybe_resample(row, epoch)
            epoch += 1

    def _maybe_resample(self, row: Row, epoch: int) -> Row:
        if not self.resample or epoch == 0:
            return row  # epoch 0 trains on the stored masks
        key = f"{row.example_id}:e{epoch}"
        t, mask = sample_row_mask(
            row.prompt_len, self.seq_len, self.seed, key, eps=self.mask_eps, block_size=self.block_size
        )
        new = {"t": float(t.mean()), "mask_positions": mask.nonzero()[:, 0].numpy().astype(np.int32)}
        if self.block_size is not None:
            new["block_t"] = t.numpy()
        return replace(row, **new)


def collate(rows: list[Row], spec: TargetSpec) -> Batch:
    """Stack rows into a Batch; targets are gathered for the masked positions, in row-major order.

    SFT padding positions get the target "EOS with probability 1" whatever the shard holds (the teacher's
    continuation after end-of-turn is not a target): the student learns EOS there from both terms, as LLaDA.
    """
    top_n = spec.top_n
    B, L = len(rows), len(rows[0].input_ids)
    ids = torch.as_tensor(np.stack([r.input_ids for r in rows]), dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.bool)
    tids, tlps = [], []
    cols = np.arange(top_n)
    for b, r in enumerate(rows):  # per row, vectorised over its masked positions (no loop over positions)
        mp = np.asarray(r.mask_positions)
        mask[b, torch.as_tensor(mp, dtype=torch.long)] = True
        tp = r.target_positions
        idx = np.searchsorted(tp, mp)  # target entry of each masked position
        has = np.zeros(len(idx), bool)
        if len(tp):
            has = (idx < len(tp)) & (tp[np.minimum(idx, len(tp) - 1)] == mp)
        idx = np.where(has, idx, 0)
        eo = r.entry_offsets
        start = eo[idx] if len(eo) > 1 else np.zeros(len(idx), np.int64)  # (P,) first entry of each position
        count = np.where(has, np.minimum((eo[idx + 1] if len(eo) > 1 else start) - start, top_n), 0)
        valid = cols[None, :] < count[:, None]  # (P, top_n)
        at = np.where(valid, start[:, None] + cols[None, :], 0)
        ti = np.where(valid, r.target_ids[at] if len(r.target_ids) else 0, 0).astype(np.int64)
        tl = np.where(valid, r.target_logprobs[at] if len(r.target_logprobs) else 0, -np.inf).astype(np.float32)
        padded = mp >= sft_padding_start(r.input_ids, r.prompt_len, spec.eos_id)  # "EOS with probability 1"
        ti[padded], tl[padded] = 0, -np.inf
        ti[padded, 0], tl[padded, 0] = spec.eos_id, 0.0
        tids.append(ti)
        tlps.append(tl)
    return Batch(
        input_ids=ids,
        mask=mask,
        prompt_len=torch.tensor([r.prompt_len for r in rows], dtype=torch.long),
        target_ids=torch.as_tensor(np.concatenate(tids)),  # (M, top_n)
        target_logprobs=torch.as_tensor(np.concatenate(tlps)),
        positions=mask.flatten().nonzero()[:, 0],
        truth=torch.tensor([r.truth for r in rows]),
        block_t=torch.as_tensor(
            np.stack([[r.t] if r.block_t is None else r.block_t for r in rows]), dtype=torch.float32
        ),
    )


@dataclass(frozen=True)
class Source:
    """A shard folder the trainer reads, and the share of each batch's rows it gives."""

    directory: Path
    manifest: Manifest
    share: float = 1.0


def mixed(streams: list[Iterator], shares: list[float], rng: random.Random) -> Iterator[Row]:
    """Rows drawn from ``streams`` in proportion to ``shares``: each row's source is drawn from ``rng``."""
    cum = np.cumsum(shares) / sum(shares)
    while True:
        j = min(int(np.searchsorted(cum, rng.random(), side="right")), len(streams) - 1)
        yield next(streams[j])[1]


class BatchLoader(torch.utils.data.IterableDataset):
    """Batches of one rank; DataLoader workers split the rank's stream further (consumer = rank * W + worker).

    ``skip_batches``: batches this rank already consumed (resume). The DataLoader takes batches from its workers
    in turn, so worker w produced batches w, w+W, w+2W, ... of them, and skips exactly that many of its own.
    Several ``sources``: each row comes from one of them, drawn by their shares (seeded per consumer).
    """

    def __init__(self, sources: list[Source], rank, world, seed, *, batch_size, skip_batches=0, **stream_kw):
        self.sources = sources
        self.rank, self.world, self.seed = rank, world, seed
        self.batch_size, self.skip_batches, self.stream_kw = batch_size, skip_batches, stream_kw

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        nw, wid = (info.num_workers, info.id) if info else (1, 0)
        # A fresh DataLoader starts its round robin at worker 0, so after `skip` batches worker w takes the
        # role of the worker that would have produced batch `skip + w`.
        skip, bs = self.skip_batches, self.batch_size
        role = (wid + skip) % nw
        consumer, consumers = self.rank * nw + role, self.world * nw
        streams = [
            iter(RowStream(s.directory, s.manifest, consumer, consumers, self.seed, **self.stream_kw))
            for s in self.sources
        ]
        if len(streams) == 1:
            it = (row for _, row in streams[0])
        else:
            it = mixed(streams, [s.share for s in self.sources], random.Random(f"{self.seed}:mix:{consumer}"))
        spec = TargetSpec.from_manifest(self.sources[0].manifest)
        for _ in range(len(range(role, skip, nw)) * bs):
            next(it)
        while True:
            yield collate([next(it) for _ in range(bs)], spec)


def load_shard_manifest(shards: str | Path, allow_partial: bool = False) -> Manifest:
    """The shard folder's manifest, after cheap checks of its files. A build whose world is not finished (some
    ranks never ran or stopped) is refused unless ``allow_partial``: a student trained on a third of the data
    without a word is worse than a one-line stop."""
    d = Path(shards)
    if not d.is_dir():
        raise UserError(f"shard folder {d} does not exist")
    try:
        m = Manifest.load(d)
    except SchemaError as e:
        raise UserError(str(e)) from e
    partial = partial_world_line(d, m)
    if partial and not allow_partial:
        raise UserError(f"{partial}; or pass --allow-partial to train on what is there")
    if partial:
        warn(
            f"{partial}; using those rows (--allow-partial): the rows the missing ranks would add are known only "
            "once they finish"
        )
    if not m.shards:
        raise UserError(f"shard folder {d} lists no shards (build not run or not finished)")
    if not (d / TOKENIZER_DIR).is_dir():
        raise UserError(f"shard folder {d} has no tokenizer/ (kdtargets build writes it; the student needs it)")
    for s in m.shards:  # cheap checks of every file before anything starts (`kdtargets validate` does them all)
        check_shard_file(d / s.file, s.bytes)
    return m
