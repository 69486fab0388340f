"""`draw.inverse_cdf`, the one token draw of the student's samplers and the precompute's."""

import pytest
import torch

from ar2mdm.student.denoise import choose
from ar2mdm.student.draw import inverse_cdf

PROBS = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.3, 0.0])  # zero mass first, between and last


def test_draws_follow_the_distribution_and_never_a_zero_probability_token():
    z = inverse_cdf(PROBS.expand(200_000, -1), torch.rand(200_000, generator=torch.Generator().manual_seed(0)))
    freq = torch.bincount(z, minlength=6).double() / len(z)
    assert freq[[0, 2, 5]].sum() == 0
    assert torch.allclose(freq, PROBS.double(), atol=0.005)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_u_at_both_ends_draws_the_first_and_the_last_token_of_positive_mass(dtype):
    """u = 0 and u just below 1 (where u·total rounds up to the total in float32) never reach a token of zero mass:
    not the leading zero, nor the trailing one."""
    top = 1 - torch.finfo(dtype).eps / 2  # the largest value below 1
    u = torch.tensor([0.0, top, 1 - 1e-16], dtype=torch.float64)  # (the last: 1 once cast to float32)
    probs = PROBS.to(dtype).expand(3, -1)
    assert inverse_cdf(probs, u).tolist() == [1, 4, 4]
    # unnormalised masses that do not sum to 1 in floating point: the same rule
    assert inverse_cdf((probs * 3.7).log().exp(), u).tolist() == [1, 4, 4]


def test_batched_shapes_and_the_students_sampler_use_it():
    """(B, k, V) masses at (B, k) uniforms, as `denoise.choose` draws them: every drawn token has positive mass."""
    probs = torch.softmax(torch.randn(4, 3, 50, generator=torch.Generator().manual_seed(1)), -1)
    probs[..., ::2] = 0.0  # every even token impossible
    gens = [torch.Generator().manual_seed(s) for s in range(4)]
    pred, conf = choose(probs, 1.0, gens)
    assert pred.shape == (4, 3) and bool((pred % 2 == 1).all()) and bool((conf > 0).all())
    u = torch.stack([torch.rand(3, generator=torch.Generator().manual_seed(s)) for s in range(4)])
    assert torch.equal(pred, inverse_cdf(probs, u))
