"""collate, vectorised over each row's masked positions, against the loop it replaced; the medium preset."""

from dataclasses import replace

import numpy as np
import torch

from ar2mdm.shared.validate import validate_dir
from ar2mdm.train.data import Row, TargetSpec, collate, rows_of_shard, sft_padding_start


def reference_collate(rows, spec):
    """The plain definition: one position at a time."""
    top_n = spec.top_n
    tids, tlps = [], []
    for r in rows:
        tp = r.target_positions
        idx = np.searchsorted(tp, r.mask_positions)
        has = np.zeros(len(idx), bool)
        if len(tp):
            has = (idx < len(tp)) & (tp[np.minimum(idx, len(tp) - 1)] == r.mask_positions)
        pad = sft_padding_start(r.input_ids, r.prompt_len, spec.eos_id)
        for j, p in enumerate(idx):
            ti = np.full(top_n, 0, np.int64)
            tl = np.full(top_n, -np.inf, np.float32)
            if r.mask_positions[j] >= pad:
                ti[0], tl[0] = spec.eos_id, 0.0
            elif has[j]:
                a, c = r.entry_offsets[p], r.entry_offsets[p + 1]
                n = min(c - a, top_n)
                ti[:n], tl[:n] = r.target_ids[a : a + n], r.target_logprobs[a : a + n]
            tids.append(ti)
            tlps.append(tl)
    return np.stack(tids), np.stack(tlps)


def same(rows, spec):
    b = collate(rows, spec)
    ti, tl = reference_collate(rows, spec)
    np.testing.assert_array_equal(b.target_ids.numpy(), ti)
    np.testing.assert_array_equal(b.target_logprobs.numpy(), tl)
    assert b.mask.sum() == len(ti)
    L = b.mask.shape[1]
    for i, r in enumerate(rows):
        assert b.mask[i].nonzero()[:, 0].tolist() == list(r.mask_positions)
    flat = [i * L + p for i, r in enumerate(rows) for p in r.mask_positions]  # the step's flat indices
    assert b.positions.tolist() == flat


def test_collate_equals_the_loop_on_shards(tiny_shards, tiny_shards_all):
    for d in (tiny_shards, tiny_shards_all):
        m = validate_dir(d)
        rows = list(rows_of_shard(d / m.shards[0].file))
        spec = TargetSpec.from_manifest(m)
        for top_n in (2, spec.top_n, spec.top_n + 3):  # truncated, exact, wider than stored
            same(rows, replace(spec, top_n=top_n))


def test_collate_equals_the_loop_on_sft_padding_and_positions_without_targets():
    eos = 2
    spec = TargetSpec(top_n=3, eos_id=eos, logprob_dtype="float32", exact_support=False)
    g = np.random.default_rng(0)
    ids = np.array([1, 5, 6, 7, 8, 9, 2, 2, 2, 2], np.int32)  # prompt 1..2, response 3..6 (EOS at 6), padding 7..9
    tp = np.array([3, 4, 6, 7, 9], np.int32)  # no target at 5 and 8
    counts = np.array([3, 1, 2, 0, 4])
    eo = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    sft = Row(
        "s",
        ids,
        3,
        0.5,
        np.array([3, 5, 6, 7, 8, 9]),
        tp,
        eo,
        g.integers(3, 20, eo[-1]),
        g.random(eo[-1]).astype(np.float32),
    )
    plain = Row(
        "p",
        ids[::-1].copy(),
        0,
        0.3,
        np.array([1, 4]),
        np.zeros(0, np.int32),
        np.zeros(1, np.int64),
        np.zeros(0, np.int64),
        np.zeros(0, np.float32),
    )
    empty = replace(plain, example_id="e", mask_positions=np.zeros(0, np.int64))
    same([sft, plain, empty], spec)
    b = collate([sft], spec)
    assert b.target_ids[3:, 0].tolist() == [eos] * 3 and (b.target_logprobs[3:, 0] == 0).all()  # padding: EOS
    assert torch.isinf(b.target_logprobs[1]).all()  # position 5: no stored target


def test_the_medium_preset_is_about_350m_parameters():
    """The GPU preset (medium): built on the meta device (no memory), counted with the tied head."""
    from ar2mdm.student.model import Student
    from ar2mdm.train.presets import student_config

    with torch.device("meta"):
        model = Student(student_config("medium", vocab_size=49152, max_positions=512))
    n = sum(p.numel() for p in model.parameters())
    assert 330e6 < n < 380e6, n


def test_the_dataloader_pins_every_tensor_of_a_batch(monkeypatch):
    """pin_memory=True pins a dataclass only through its own pin_memory(): without it the batch stays pageable and
    the step's non_blocking copy blocks. (Pinning needs CUDA; the tensor method is stood in for here.)"""
    from torch.utils.data._utils.pin_memory import pin_memory

    from ar2mdm.train.data import Batch

    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t, *a, **k: pinned.append(t) or t.clone())
    b = Batch(*(torch.arange(3) + i for i in range(len(Batch.__dataclass_fields__))))
    out = pin_memory(b)
    assert isinstance(out, Batch) and len(pinned) == len(Batch.__dataclass_fields__)
    assert all(torch.equal(getattr(out, f), getattr(b, f)) for f in Batch.__dataclass_fields__)
