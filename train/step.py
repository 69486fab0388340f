"""One step's pieces, shared by the training loop and `kdtrain eval`: the device, mixed precision, and the
loss of a batch."""

from __future__ import annotations

import math

import torch

from ar2mdm.shared.masking import maskable_positions
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import Batch, TargetSpec
from ar2mdm.train.losses import (
    combined_loss,
    corrupt,
    elbo_weight,
    kd_loss,
    kd_weight,
    mdm_loss,
    row_norm,
    storage_slack,
    student_logprobs,
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
) -> tuple[torch.Tensor, dict]:
    """Loss of one batch: (1-λ)·MDM + λ·KD, and its parts as floats. ``progress``: step / total steps, for a
    λ schedule; with a schedule or a t-dependent λ, each row gets its own λ_b (`losses.kd_weight`)."""
    x_t = corrupt(batch.input_ids, batch.mask, mask_id)  # (B, L)
    logits = model(x_t, batch.mask)  # (M, V) at the masked positions
    row = batch.mask.nonzero()[:, 0]  # (M,)
    L = batch.input_ids.shape[1]
    norm = row_norm(batch.prompt_len, L)  # seed §1: 1/L pretrain, 1/|response| SFT
    if cfg.loss_weighting == "elbo":
        weight = elbo_weight(batch.t, batch.mask, maskable_positions(L, batch.prompt_len))  # (B,)
    else:
        weight = torch.ones_like(batch.t)
    per_row = cfg.lam > 0.0 and (cfg.schedule != "constant" or cfg.lambda_t != "none")  # λ = 0 stays 0: no KD term
    lam = kd_weight(cfg.lam, progress, batch.t, cfg.schedule, cfg.lambda_t) if per_row else cfg.lam  # (B,) or float
    parts = {}
    mdm = kd = None
    logp = student_logprobs(logits)  # (M, V) at T = 1, shared by both terms; KD tempers from it
    if per_row or cfg.lam < 1.0:
        mdm = mdm_loss(logp, batch.input_ids[batch.mask], row, norm, weight, per_row=per_row)
        parts["mdm"] = float(mdm.detach().mean())
    if per_row or cfg.lam > 0.0:
        tail = cfg.tail_for(spec.exact_support)
        slack = None
        if tail == "bucket":  # a leftover within the storage rounding is no tail; exact supports have none
            tl = batch.target_logprobs
            slack = tl.new_full(tl.shape[:1], math.inf) if spec.exact_support else storage_slack(tl, spec.logprob_dtype)
        kd = kd_loss(
            logp, batch.target_ids, batch.target_logprobs, row, norm, cfg.temperature, tail, slack, per_row=per_row
        )
        parts["kd"] = float(kd.detach().mean())
    if per_row:
        parts["lambda"] = float(lam.mean())
    loss = combined_loss(mdm, kd, lam)
    parts["loss"] = float(loss.detach())
    return loss, parts
