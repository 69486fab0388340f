"""One step's pieces, shared by the training loop and `kdtrain eval`: the device, mixed precision, and the
loss of a batch."""

from __future__ import annotations

import torch

from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import Batch, TargetSpec
from ar2mdm.train.losses import (
    batch_loss,
    corrupt,
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
    model, batch: Batch, cfg: TrainConfig, mask_id: int, spec: TargetSpec, *, progress: float = 0.0
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Loss of one batch: the student's forward at the masked positions, then `batch_loss`."""
    x_t = corrupt(batch.input_ids, batch.mask, mask_id)  # (B, L)
    return batch_loss(model(x_t, batch.positions), batch, cfg, spec, progress)  # (M, V) logits


def read_parts(parts: dict[str, torch.Tensor], *more: torch.Tensor) -> tuple[dict[str, float], list[float]]:
    """The loss parts (and ``more`` 0-d tensors, e.g. the gradient norm) as floats, read in one host sync."""
    more = tuple(m.full_tensor() if hasattr(m, "full_tensor") else m for m in more)  # FSDP2's norm is a DTensor
    values = torch.stack([*parts.values(), *more]).float().tolist() if parts or more else []
    return dict(zip(parts, values)), values[len(parts) :]
