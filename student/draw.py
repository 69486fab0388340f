"""The token draw of every sampler, the student's and the teacher's: inverse CDF at a given uniform."""

from __future__ import annotations

import torch


def inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """(...,) long: one token per row of ``probs`` (..., V), non-negative masses (not necessarily summing to 1),
    at the uniforms ``u`` (...,) in [0, 1): the first token whose cumulative mass exceeds u·(total mass).

    Never a token of mass 0: at u = 0 the first token of positive mass; where u·total rounds up to the total (u
    within rounding of 1) the last token of positive mass. The clamp keeps NaN masses (an overflowing model) an
    index in range, for the caller's finiteness check to report."""
    cdf = probs.cumsum(-1)  # (..., V)
    total = cdf[..., -1:].contiguous()  # (..., 1)
    z = torch.searchsorted(cdf, u.to(cdf.dtype)[..., None] * total, right=True)  # (..., 1)
    return torch.minimum(z, torch.searchsorted(cdf, total))[..., 0].clamp_(max=probs.shape[-1] - 1)
