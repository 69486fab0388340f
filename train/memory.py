"""`--batch-size auto`: the largest micro-batch whose training step fits in the GPU's memory, found by trying.

A memory setting only: what the optimizer sees per step stays the rows the run would take without it (16 per
rank, the field's default, or ``--batch-tokens``), and ``--grad-accum`` makes up the difference. Estimating
activation memory from the config is fragile (attention kernels, autocast copies, the chunked loss, the
allocator's rounding), so each candidate runs one real forward and backward on a made-up batch at its worst case
(every position masked, a full row of targets at each) and its peak is read from the allocator.
"""

from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable

import torch

from ar2mdm.shared.blocks import num_blocks
from ar2mdm.shared.errors import UserError
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import Batch, TargetSpec
from ar2mdm.train.objective import step_losses

HEADROOM = 0.9  # of the memory the process could hold: the allocator's fragmentation, compile's own buffers


def largest_fitting(fits: Callable[[int], bool], most: int) -> int:
    """The largest b in [1, most] with ``fits(b)``, for a ``fits`` that holds up to some b and fails above it:
    doubling from 1, then bisecting between the last b that fit and the first that did not; 0 if 1 does not fit.
    About 2·log2(most) trials."""
    lo, hi = 0, None  # lo fits (0: nothing yet); hi does not
    b = 1
    while b <= most:
        if not fits(b):
            hi = b
            break
        lo, b = b, 2 * b
    if hi is None:
        if lo == most or fits(most):
            return most
        hi = most
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def even_split(rows: int, most: int) -> tuple[int, int]:
    """(micro-batch, micro-batches) covering ``rows`` with micro-batches of at most ``most`` rows, as evenly as
    possible: 1,024 rows with at most 700 fitting -> (512, 2), not (700, 2), which would train 1,400."""
    accum = math.ceil(rows / most)
    return math.ceil(rows / accum), accum


def worst_batch(b: int, seq_len: int, top_n: int, mask_id: int, device: str, *, num_blocks: int = 1) -> Batch:
    """A made-up batch of ``b`` rows at a step's most: every position masked, ``top_n`` distinct target ids at
    each. Its values come from a generator of its own: trying batches leaves the run's random state as it was."""
    g = torch.Generator().manual_seed(0)
    M = b * seq_len
    base = torch.randint(0, mask_id, (M, 1), generator=g)
    return Batch(
        input_ids=torch.randint(0, mask_id, (b, seq_len), generator=g),
        mask=torch.ones(b, seq_len, dtype=torch.bool),
        prompt_len=torch.zeros(b, dtype=torch.long),
        target_ids=(base + torch.arange(top_n)) % mask_id,  # distinct, as a build's are
        target_logprobs=torch.log_softmax(torch.randn(M, top_n, generator=g), -1),
        positions=torch.arange(M),
        truth=torch.ones(b, dtype=torch.bool),
        block_t=torch.ones(b, num_blocks),
    ).to(device)


def step_peak(model, batch: Batch, cfg: TrainConfig, spec: TargetSpec, autocast) -> int:
    """Peak bytes the allocator held over one forward and backward of ``batch`` (CUDA); the gradients are
    dropped after, so the model is as it was. Raises torch.cuda.OutOfMemoryError where it does not fit."""
    cuda = batch.input_ids.is_cuda
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        with autocast:
            loss, _ = step_losses(model, batch, cfg.objective(spec), spec, mask_id=model.config.mask_id)
        loss.backward()
        return torch.cuda.max_memory_allocated() if cuda else 0
    finally:
        loss = None
        for p in model.parameters():
            p.grad = None
        if cuda:
            torch.cuda.empty_cache()


def auto_batch(
    cfg: TrainConfig, model, spec: TargetSpec, *, seq_len: int, world: int, device: str, autocast, fsdp: bool
) -> tuple[TrainConfig, str]:
    """``cfg`` with --batch-size auto turned into a micro-batch and --grad-accum, and a line saying why.

    The rows of an optimizer step per rank are --batch-tokens / (seq_len x ranks) or the field's default; on the
    CPU (whose memory is not what limits a step) that many go in one micro-batch, up to the default. On CUDA
    the bare student is tried (no DDP hooks or FSDP collectives, so a rank that runs out of memory stops no
    other), with the optimizer's two moments (and DDP's gradient buckets) held aside; ranks take the smallest
    micro-batch any of them fits. Under FSDP the whole student is tried, unsharded: a smaller batch than fits."""
    default = TrainConfig.__dataclass_fields__["batch_size"].default
    rows = math.ceil(cfg.batch_tokens / (seq_len * world)) if cfg.batch_tokens is not None else default
    if not device.startswith("cuda"):
        most, why = min(rows, default), "the CPU"
    else:
        params = sum(p.numel() * p.element_size() for p in model.parameters())
        held = params * (3 if world > 1 and not fsdp else 2)  # AdamW's exp_avg and exp_avg_sq (+ DDP's buckets)
        aside = torch.empty(held, dtype=torch.uint8, device=device)
        free, _ = torch.cuda.mem_get_info()
        budget = HEADROOM * (free + torch.cuda.memory_reserved())

        def fits(b: int) -> bool:
            try:
                nb = num_blocks(seq_len, spec.block_size)
                batch = worst_batch(b, seq_len, spec.top_n, model.config.mask_id, device, num_blocks=nb)
                return step_peak(model, batch, cfg, spec, autocast) <= budget
            except torch.cuda.OutOfMemoryError:
                return False

        most = largest_fitting(fits, rows)
        del aside
        torch.cuda.empty_cache()
        if world > 1:
            t = torch.tensor(most, device=device)
            torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
            most = int(t)
        if most == 0:
            raise UserError(
                f"--batch-size auto: not even one row of {seq_len} tokens fits in the GPU's "
                f"{free / 2**30:.1f} GiB free; a smaller --student, or shards of shorter rows"
            )
        why = f"the most of {rows} that fits in {HEADROOM:.0%} of {budget / HEADROOM / 2**30:.1f} GiB"
    batch, accum = even_split(rows, most)
    return replace(cfg, batch_size=batch, grad_accum=accum), f"--batch-size auto: {batch} x {accum} ({why})"
