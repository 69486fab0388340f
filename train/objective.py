"""The training objective of a batch: the student's forward at its masked positions, then (1-λ)·MDM + λ·KD
(docs/design.md §1–§2, §6), from the pure loss functions of `losses`."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ar2mdm.shared.masking import maskable_positions
from ar2mdm.student.blocks import block_of
from ar2mdm.train.data import Batch, TargetSpec
from ar2mdm.train.losses import (
    SparseTargets,
    combined_loss,
    corrupt,
    elbo_weight,
    kd_loss,
    kd_weight,
    masked_losses,
    mdm_loss,
    row_norm,
    storage_slack,
)


@dataclass(frozen=True)
class Objective:
    """What the objective takes of a run's settings, decoded once (`TrainConfig.objective`)."""

    lam: float = 0.5  # λ
    schedule: str = "constant"  # λ over training progress (`losses.kd_weight`)
    lambda_t: str = "none"  # λ over the mask ratio of a position's row or block
    temperature: float = 1.0  # T
    tail: str = "renormalize"  # the mass outside the stored support: renormalize | bucket (`losses.sparse_kl`)
    weighting: str = "seed"  # the MDM term's weight: seed (none) | elbo (1/t, `losses.elbo_weight`)

    def varies(self, spec: TargetSpec) -> bool:
        """Whether λ differs between positions (a schedule, λ over t, or rows without truth)."""
        return self.lam > 0.0 and (self.schedule != "constant" or self.lambda_t != "none" or spec.states)


def position_t(batch: Batch, row: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """(M,) the mask ratio of each masked position: its block's (a block build's ``block_t``), else its row's."""
    L = batch.input_ids.shape[1]
    return batch.block_t[row, block_of(batch.positions % L, block_size)]


def batch_targets(batch: Batch, obj: Objective, spec: TargetSpec) -> SparseTargets:
    """The batch's stored targets as the KD term reads them: at the objective's T and tail, and with the bucket
    tail, the leftover that is storage rounding (none where the stored entries are the whole target)."""
    slack = None
    if obj.tail == "bucket":
        tl = batch.target_logprobs
        slack = tl.new_full(tl.shape[:1], math.inf) if spec.exact_support else storage_slack(tl, spec.logprob_dtype)
    return SparseTargets(batch.target_ids, batch.target_logprobs, obj.temperature, obj.tail, slack)


def batch_loss(
    logits: torch.Tensor, batch: Batch, obj: Objective, spec: TargetSpec, progress: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1-λ)·MDM + λ·KD from the (M, V) logits at the batch's masked positions, and its parts as 0-d tensors on
    the device (`device.read_parts` turns them into floats with one host sync). ``progress``: step / total steps,
    for a λ schedule; where λ varies (`Objective.varies`), each position gets its own λ_i from its row's or
    block's t. Where the shards hold a student's states (``spec.states``), a row without truth at its masked
    positions (``batch.truth`` False) gets no MDM term and its KD term alone: λ_i = 1 (docs/design.md, on-policy
    rows).

    Nothing here waits for the device: the masked positions come from the batch (``positions``, made on the
    host by `data.collate`), not from a nonzero() or a boolean index of device tensors."""
    L = batch.input_ids.shape[1]
    row = batch.positions // L  # (M,)
    norm = row_norm(batch.prompt_len, L)  # docs/design.md §1: 1/L pretrain, 1/|response| SFT
    t = position_t(batch, row, spec.block_size)  # (M,)
    if obj.weighting == "elbo":
        weight = elbo_weight(t, row, batch.mask, maskable_positions(L, batch.prompt_len))  # (M,)
    else:
        weight = torch.ones_like(t)
    varies = obj.varies(spec)
    lam = kd_weight(obj.lam, progress, t, obj.schedule, obj.lambda_t) if varies else obj.lam  # (M,) or float
    if varies and spec.states:  # no truth, no MDM term: these rows carry their targets alone
        truth = batch.truth[row]
        lam = torch.where(truth, lam, torch.ones_like(lam))
        weight = weight * truth
    targets = batch_targets(batch, obj, spec) if varies or obj.lam > 0.0 else None
    nll, kl = masked_losses(logits, batch.input_ids.flatten()[batch.positions], targets)  # (M,), (M,) or None
    parts = {}
    if varies:
        mdm, kd = mdm_loss(nll, row, norm, (1.0 - lam) * weight), kd_loss(lam * kl, row, norm)
        loss = mdm + kd
        parts["mdm"] = mdm_loss(nll, row, norm, weight).detach()
        parts["kd"] = kd_loss(kl, row, norm).detach()
        parts["lambda"] = lam.mean()
    else:
        mdm = mdm_loss(nll, row, norm, weight) if obj.lam < 1.0 else None
        kd = kd_loss(kl, row, norm) if kl is not None else None
        loss = combined_loss(mdm, kd, obj.lam)
        parts.update({k: v.detach() for k, v in (("mdm", mdm), ("kd", kd)) if v is not None})
    parts["loss"] = loss.detach()
    return loss, parts


def step_losses(
    model, batch: Batch, obj: Objective, spec: TargetSpec, *, mask_id: int, progress: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch: the student's forward at the masked positions (a block student reads the clean row
    beside the noisy one), then `batch_loss`."""
    x_t = corrupt(batch.input_ids, batch.mask, mask_id)  # (B, L)
    logits = model(x_t, batch.positions, context=batch.input_ids)  # (M, V)
    return batch_loss(logits, batch, obj, spec, progress)
