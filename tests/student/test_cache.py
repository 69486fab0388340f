"""The block student's preallocated KV cache and the forwards each sampler counts."""

import torch

from ar2mdm.student.block_sampler import block_generate
from ar2mdm.student.blocks import attends, shift_source
from ar2mdm.student.cache import KVCache
from ar2mdm.student.denoise import denoise
from ar2mdm.student.model import Student, StudentConfig


def student(block_size=4, shift=True):
    torch.manual_seed(0)
    c = StudentConfig(vocab_size=20, hidden_size=16, num_layers=2, num_heads=2, num_kv_heads=1, shift=shift)
    c.block_size = block_size
    return Student(c).eval()


def test_update_writes_after_the_held_positions_and_advance_keeps_the_committed():
    cache = KVCache(num_layers=1, batch=1, num_kv_heads=1, head_dim=2, max_len=8, dtype=torch.float32, device="cpu")
    k = torch.arange(6.0).view(1, 1, 3, 2)
    keys, _ = cache.update(0, k, k)
    assert keys.data_ptr() == cache.keys.data_ptr() and keys.shape[2] == 3  # a view, not a copy
    cache.advance(2)  # the first two were clean: kept; the third is overwritten by the next forward
    keys, _ = cache.update(0, -k[:, :, :1], -k[:, :, :1])
    assert cache.length == 2 and keys[0, 0].tolist() == [[0, 1], [2, 3], [0, -1]]


def test_sampling_reuses_one_buffer_and_holds_the_committed_blocks():
    m = student()
    prompt = torch.tensor([[1, 5, 6, 7, 8, 9]])  # one whole block of prompt, then two tokens
    cache = KVCache.for_model(m, 1, 16)
    ptr = cache.keys.data_ptr()
    x, forwards = block_generate(m, prompt, 9, seeds=[0], cache=cache)  # through position 15: blocks 0..3
    assert cache.keys.data_ptr() == ptr
    assert cache.length == 12  # every block but the last was committed by the forward after it
    assert int(forwards[0]) >= 3  # at least one forward a block to fill


def test_the_rules_on_a_hand_made_case():
    """Blocks of 2: noisy (n) and clean (c) copies of positions 0..3."""
    blk = torch.tensor([0, 0, 1, 1])
    noisy, clean = torch.zeros(4, dtype=torch.bool), torch.ones(4, dtype=torch.bool)
    # a noisy token of block 1 (position 2): its own block's noisy tokens, block 0's clean ones, nothing else
    assert attends(blk[2], noisy[2], blk, noisy).tolist() == [False, False, True, True]
    assert attends(blk[2], noisy[2], blk, clean).tolist() == [True, True, False, False]
    # a clean token of block 0: block 0's clean tokens only
    assert attends(blk[0], clean[0], blk, clean).tolist() == [True, True, False, False]
    assert attends(blk[0], clean[0], blk, noisy).tolist() == [False] * 4
    src, from_clean = shift_source(torch.arange(5), 2)
    assert src.tolist() == [0, 0, 1, 2, 3] and from_clean.tolist() == [False, False, True, False, True]
    assert not shift_source(torch.arange(5), None)[1].any()


def test_a_full_attention_student_counts_the_forwards_it_ran():
    m = student(block_size=None)
    x = torch.cat([torch.tensor([[1, 5, 6]]), torch.full((1, 16), 20)], dim=1)
    seen = []
    _, forwards = denoise(m, x, 32, seeds=[0], on_step=lambda s, rows: seen.append(s), return_forwards=True)
    assert int(forwards[0]) == len(seen) == 16  # 32 steps asked, one token at least each: 16 forwards
