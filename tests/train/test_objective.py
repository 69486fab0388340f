"""The objective of a batch, (1-λ)·MDM + λ·KD, against its terms computed by hand: per-position λ and 1/t weights
from each position's row or block."""

import math

import pytest
import torch

from ar2mdm.train.data import Batch, TargetSpec
from ar2mdm.train.losses import SparseTargets, masked_losses
from ar2mdm.train.objective import Objective, batch_loss

V, L = 11, 8


def batch(block_t: torch.Tensor) -> Batch:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, V, (2, L), generator=g)
    mask = torch.zeros(2, L, dtype=torch.bool)
    mask[0, [1, 2, 6]] = True
    mask[1, [5]] = True  # one masked position: the forced-mask correction
    M = int(mask.sum())
    tid = torch.stack([torch.randperm(V, generator=g)[:3] for _ in range(M)])
    tlp = torch.log_softmax(torch.randn(M, 3, generator=g), -1)
    return Batch(
        input_ids=ids,
        mask=mask,
        prompt_len=torch.zeros(2, dtype=torch.long),
        target_ids=tid,
        target_logprobs=tlp,
        positions=mask.flatten().nonzero()[:, 0],
        truth=torch.ones(2, dtype=torch.bool),
        block_t=block_t,
    )


@pytest.mark.parametrize("block_size", [None, 4])
def test_lambda_and_weights_follow_each_positions_row_or_block(block_size):
    block_t = torch.tensor([[0.2, 0.7], [0.5, 0.9]]) if block_size else torch.tensor([[0.3], [0.6]])
    b = batch(block_t)
    spec = TargetSpec(top_n=3, eos_id=2, logprob_dtype="float32", exact_support=True, block_size=block_size)
    obj = Objective(lam=0.5, lambda_t="low-t", weighting="elbo", tail="renormalize")
    logits = torch.randn(len(b.positions), V, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    loss, parts = batch_loss(logits, b, obj, spec)
    nll, kl = masked_losses(
        logits, b.input_ids.flatten()[b.positions], SparseTargets(b.target_ids, b.target_logprobs, 1.0, "renormalize")
    )
    total = 0.0
    for j, flat in enumerate(b.positions.tolist()):
        r, i = divmod(flat, L)
        t = float(block_t[r, i // (block_size or L)])
        lam = min(1.0, 0.5 * 2 * (1 - t))
        n = L - 1  # maskable: every position but BOS
        w = n / ((1 - t) + n * t) if b.mask[r].sum() == 1 else 1 / t
        total += ((1 - lam) * w * float(nll[j]) + lam * float(kl[j])) / L
    assert float(loss) == pytest.approx(total / 2, rel=1e-6)
    assert math.isfinite(float(parts["lambda"]))


def test_a_constant_lambda_drops_the_unused_term():
    b = batch(torch.tensor([[0.3], [0.6]]))
    spec = TargetSpec(top_n=3, eos_id=2, logprob_dtype="float32", exact_support=True)
    logits = torch.randn(len(b.positions), V, requires_grad=True)
    _, parts = batch_loss(logits, b, Objective(lam=0.0), spec)
    assert "kd" not in parts and "mdm" in parts
    _, parts = batch_loss(logits, b, Objective(lam=1.0), spec)
    assert "mdm" not in parts and "kd" in parts
