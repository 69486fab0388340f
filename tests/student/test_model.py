import torch
import torch.nn.functional as F

from ar2mdm.student.model import Attention, Student, StudentConfig, rope_cos_sin, rope_inv_freq


def test_grouped_query_attention_equals_copied_kv_heads():
    """2 kv heads for 6 query heads: on the CPU the student copies them; on CUDA in half precision it hands them
    to the flash kernel as they are (enable_gqa), which must score as the copies do (checked here on the CPU's
    kernel, the GPU path being unavailable)."""
    torch.manual_seed(0)
    c = StudentConfig(vocab_size=50, hidden_size=48, num_heads=6, num_kv_heads=2)
    att = Attention(c).double()
    x = torch.randn(2, 7, 48, dtype=torch.float64)
    cos, sin = rope_cos_sin(torch.arange(7), rope_inv_freq(8, c.rope_theta, None), torch.float64)
    got = att(x, cos, sin)
    from ar2mdm.student.model import rope

    q = rope(att.q_proj(x).view(2, 7, 6, 8).transpose(1, 2), cos, sin)
    k = rope(att.k_proj(x).view(2, 7, 2, 8).transpose(1, 2), cos, sin).repeat_interleave(3, 1)
    v = att.v_proj(x).view(2, 7, 2, 8).transpose(1, 2).repeat_interleave(3, 1)
    ref = att.o_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 7, -1))
    assert torch.allclose(got, ref, atol=1e-12)
    k1 = rope(att.k_proj(x).view(2, 7, 2, 8).transpose(1, 2), cos, sin)
    v1 = att.v_proj(x).view(2, 7, 2, 8).transpose(1, 2)
    grouped = F.scaled_dot_product_attention(q, k1, v1, enable_gqa=True)
    assert torch.allclose(att.o_proj(grouped.transpose(1, 2).reshape(2, 7, -1)), ref, atol=1e-12)


def test_flat_positions_select_what_the_boolean_mask_selects():
    """The training step gathers the masked positions by their flat indices (no host sync); same logits, same order."""
    torch.manual_seed(1)
    for shift in (False, True):
        model = Student(StudentConfig(vocab_size=30, hidden_size=32, num_heads=2, num_kv_heads=1, shift=shift))
        x = torch.randint(0, 31, (3, 9))
        mask = torch.rand(3, 9) < 0.4
        flat = mask.flatten().nonzero()[:, 0]
        assert torch.equal(model(x, mask), model(x, flat))
