import torch

from ar2mdm.shared.masking import maskable_positions, sample_masks, sample_row_mask


def test_row_masks_are_deterministic_and_respect_bos_and_prompt():
    t1, m1 = sample_row_mask(prompt_len=5, seq_len=32, seed=7, key="00000-00000003-m0")
    t2, m2 = sample_row_mask(prompt_len=5, seq_len=32, seed=7, key="00000-00000003-m0")
    t3, m3 = sample_row_mask(prompt_len=5, seq_len=32, seed=7, key="00000-00000003-m1")
    assert t1 == t2 and torch.equal(m1, m2)
    assert (t1, m1.tolist()) != (t3, m3.tolist())
    assert not m1[:5].any() and m1.any()
    _, m0 = sample_row_mask(prompt_len=0, seq_len=8, seed=0, key="x")
    assert not m0[0]  # BOS is never masked


def test_at_least_one_masked_and_rate_follows_t():
    maskable = maskable_positions(64, torch.zeros(4000, dtype=torch.long))
    g = torch.Generator().manual_seed(0)
    t, mask = sample_masks(maskable, g, eps=1e-3)
    assert mask.any(dim=1).all()  # even rows with tiny t
    assert (t >= 1e-3).all() and (t < 1).all()
    assert not mask[:, 0].any()
    # E[#masked | t] = 63 t for t not tiny; check the regression slope
    rate = mask[:, 1:].float().mean(dim=1)
    big = t > 0.1
    assert (rate[big] - t[big]).abs().mean() < 0.06
    assert abs(float(t.mean()) - 0.5) < 0.03  # t ~ U(eps, 1)


def test_sft_rows_only_mask_the_response():
    plen = torch.tensor([10, 30, 63])
    maskable = maskable_positions(64, plen)
    t, mask = sample_masks(maskable, torch.Generator().manual_seed(1))
    for b, p in enumerate(plen.tolist()):
        assert not mask[b, :p].any() and mask[b, p:].any()
