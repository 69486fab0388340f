"""`likelihood`: the chain rule against one forward per token, the AR likelihood at block size 1, the ELBO where
it is exact."""

from dataclasses import replace

import pytest
import torch

from ar2mdm.student.model import Student, StudentConfig
from ar2mdm.train.likelihood import chain_scores, elbo_score, whole_blocks

V = 30


def student(block_size, shift=True):
    torch.manual_seed(0)
    c = StudentConfig(vocab_size=V, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
    return Student(replace(c, shift=shift, block_size=block_size)).double().eval()


@torch.no_grad()
def one_forward_per_token(model, ids, start):
    """log p(x_i | x_<i, masks at every later continuation position), a forward for each i: the definition."""
    c = model.config
    row = torch.tensor([whole_blocks(ids, c.block_size, c.mask_id)])
    out = []
    for i in range(start, len(ids)):
        x_t = row.clone()
        x_t[0, i : len(ids)] = c.mask_id
        logp = torch.log_softmax(model(x_t, context=row)[0, i], -1)
        out.append(float(logp[ids[i]]))
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("block_size", [None, 1, 3, 4])
@pytest.mark.parametrize("shift", [False, True])
def test_the_chain_is_one_forward_per_token_in_b_forwards(block_size, shift):
    m = student(block_size, shift)
    ids = torch.randint(0, V, (13,), generator=torch.Generator().manual_seed(1)).tolist()
    for start in (1, 5, 6):  # a continuation that starts inside a block, at its start, and ends inside one
        logp, greedy = chain_scores(m, ids, start)
        assert torch.allclose(logp, one_forward_per_token(m, ids, start), atol=1e-10)
        assert greedy.shape == (len(ids) - start,)


@torch.no_grad()
def test_at_block_size_one_the_adapted_student_scores_what_its_teacher_does(tiny_teacher):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ar2mdm.shared.tokenizer import tokenizer_hash
    from ar2mdm.train.init import student_from_ar

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    ar = AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()
    n = ar.config.vocab_size
    s = student_from_ar(str(tiny_teacher), n, tokenizer_hash(tok), 16, shift=True, block_size=1).eval()
    x = torch.randint(3, n, (16,), generator=torch.Generator().manual_seed(4))
    x[0] = 1
    lp = torch.log_softmax(ar(x[None]).logits[0].double(), -1)[:-1].gather(1, x[1:, None])[:, 0]  # (15,)
    logp, greedy = chain_scores(s, x.tolist(), 6)
    assert torch.allclose(logp.double(), lp[5:], atol=1e-4)
    assert greedy.tolist() == (ar(x[None]).logits[0, 5:-1].argmax(-1) == x[6:]).tolist()
    value, se = elbo_score(s, x.tolist(), 6, 3, torch.Generator().manual_seed(0))  # one token a block: exact
    assert value == pytest.approx(float(lp[5:].sum()), abs=1e-3) and se == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("block_size", [None, 4])
def test_the_elbo_of_one_token_is_its_log_probability(block_size):
    m = student(block_size)
    ids = torch.randint(0, V, (9,), generator=torch.Generator().manual_seed(2)).tolist()
    value, se = elbo_score(m, ids, 8, 4, torch.Generator().manual_seed(0))
    assert value == pytest.approx(float(chain_scores(m, ids, 8)[0][0]), abs=1e-5) and se == pytest.approx(0.0)
