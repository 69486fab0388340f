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
    assert t.shape == (4000, 1)
    t = t[:, 0]
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


def test_blocks_draw_one_t_each_and_mask_at_their_own_rate():
    maskable = maskable_positions(64, torch.zeros(3000, dtype=torch.long))
    t, mask = sample_masks(maskable, torch.Generator().manual_seed(2), block_size=16)
    assert t.shape == (3000, 4) and mask.any(dim=1).all()
    for b in range(4):
        lo = max(1, 16 * b)
        rate = mask[:, lo : 16 * (b + 1)].float().mean(1)
        big = t[:, b] > 0.2
        assert (rate[big] - t[big, b]).abs().mean() < 0.12  # each block follows its own t, not the row's
    # the blocks' ts are independent: their correlation is near 0
    assert abs(float(torch.corrcoef(t[:, :2].T)[0, 1])) < 0.05
    # one block per row draws the same random stream as no blocks at all (whole-row builds are unchanged)
    same = sample_masks(maskable[:5], torch.Generator().manual_seed(3), block_size=64)
    plain = sample_masks(maskable[:5], torch.Generator().manual_seed(3))
    assert torch.equal(same[0], plain[0]) and torch.equal(same[1], plain[1])
