"""One step's pieces, shared by the training loop and `kdtrain eval`: the device, mixed precision, and the
loss of a batch."""

from __future__ import annotations

import math

import torch

from ar2mdm.shared.masking import maskable_positions
from ar2mdm.train.config import TrainConfig
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


def resolve_device(device: str) -> str:
    """ "auto" -> cuda when available, else cpu."""
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: str, dtype: str):
    """Mixed precision for the forward: auto = bf16 autocast on CUDA, fp32 on CPU; float32 = none."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "float32" or (dtype == "auto" and kind == "cpu"):
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=torch.bfloat16 if dtype in ("auto", "bfloat16") else torch.float16)


def step_losses(
    model, batch: Batch, cfg: TrainConfig, mask_id: int, spec: TargetSpec, progress: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch: the student's forward at the masked positions, then `batch_loss`."""
    x_t = corrupt(batch.input_ids, batch.mask, mask_id)  # (B, L)
    return batch_loss(model(x_t, batch.positions), batch, cfg, spec, progress)  # (M, V) logits


def batch_loss(
    logits: torch.Tensor, batch: Batch, cfg: TrainConfig, spec: TargetSpec, progress: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(1-λ)·MDM + λ·KD from the (M, V) logits at the batch's masked positions, and its parts as 0-d tensors on
    the device (`read_parts` turns them into floats with one host sync). ``progress``: step / total steps, for
    a λ schedule; with a schedule or a t-dependent λ, each row gets its own λ_b (`losses.kd_weight`).

    Nothing here waits for the device: the masked positions come from the batch (``positions``, made on the
    host by `collate`), not from a nonzero() or a boolean index of device tensors."""
    L = batch.input_ids.shape[1]
    row = batch.positions // L  # (M,)
    norm = row_norm(batch.prompt_len, L)  # seed §1: 1/L pretrain, 1/|response| SFT
    if cfg.loss_weighting == "elbo":
        weight = elbo_weight(batch.t, batch.mask, maskable_positions(L, batch.prompt_len))  # (B,)
    else:
        weight = torch.ones_like(batch.t)
    per_row = cfg.lam > 0.0 and (cfg.schedule != "constant" or cfg.lambda_t != "none")  # λ = 0 stays 0: no KD term
    lam = kd_weight(cfg.lam, progress, batch.t, cfg.schedule, cfg.lambda_t) if per_row else cfg.lam  # (B,) or float
    targets = None
    if per_row or cfg.lam > 0.0:
        tail = cfg.tail_for(spec.exact_support)
        slack = None
        if tail == "bucket":  # a leftover within the storage rounding is no tail; exact supports have none
            tl = batch.target_logprobs
            slack = tl.new_full(tl.shape[:1], math.inf) if spec.exact_support else storage_slack(tl, spec.logprob_dtype)
        targets = SparseTargets(batch.target_ids, batch.target_logprobs, cfg.temperature, tail, slack)
    nll, kl = masked_losses(logits, batch.input_ids.flatten()[batch.positions], targets)  # (M,), (M,) or None
    parts = {}
    mdm = kd = None
    if per_row or cfg.lam < 1.0:
        mdm = mdm_loss(nll, row, norm, weight, per_row=per_row)
        parts["mdm"] = mdm.detach().mean()
    if kl is not None:
        kd = kd_loss(kl, row, norm, per_row=per_row)
        parts["kd"] = kd.detach().mean()
    if per_row:
        parts["lambda"] = lam.mean()
    loss = combined_loss(mdm, kd, lam)
    parts["loss"] = loss.detach()
    return loss, parts


def read_parts(parts: dict[str, torch.Tensor], *more: torch.Tensor) -> tuple[dict[str, float], list[float]]:
    """The loss parts (and ``more`` 0-d tensors, e.g. the gradient norm) as floats, read in one host sync."""
    more = tuple(m.full_tensor() if hasattr(m, "full_tensor") else m for m in more)  # FSDP2's norm is a DTensor
    values = torch.stack([*parts.values(), *more]).float().tolist() if parts or more else []
    return dict(zip(parts, values)), values[len(parts) :]
