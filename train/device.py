"""Where a step runs: the device, mixed precision, and reading a step's values back in one host sync."""

from __future__ import annotations

import torch


def resolve_device(device: str) -> str:
    """ "auto" -> cuda when available, else cpu."""
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: str, dtype: str):
    """Mixed precision for the forward: auto = bf16 autocast on CUDA, fp32 on CPU; float32 = none."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "float32" or (dtype == "auto" and kind == "cpu"):
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=torch.bfloat16 if dtype in ("auto", "bfloat16") else torch.float16)


def read_parts(parts: dict[str, torch.Tensor], *more: torch.Tensor) -> tuple[dict[str, float], list[float]]:
    """The loss parts (and ``more`` 0-d tensors, e.g. the gradient norm) as floats, read in one host sync."""
    more = tuple(m.full_tensor() if hasattr(m, "full_tensor") else m for m in more)  # FSDP2's norm is a DTensor
    values = torch.stack([*parts.values(), *more]).float().tolist() if parts or more else []
    return dict(zip(parts, values)), values[len(parts) :]
