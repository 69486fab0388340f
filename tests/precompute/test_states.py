"""`kdtargets build --states`: targets on a student's states, against exact enumeration, and its one-line errors."""

import json

import numpy as np
import pytest
import torch

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig
from ar2mdm.precompute.teacher import TorchTeacher
from ar2mdm.schemas import Manifest
from ar2mdm.schemas.states import StateRecord, StateSource, write_states
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.shards import read_shard
from ar2mdm.shared.tokenizer import tokenizer_hash
from ar2mdm.shared.validate import validate_dir
from tests.precompute.reference import rescore_naive
from tests.precompute.test_mc import dense, exact_limits, tv
from tests.tiny import char_tokenizer, tiny_llama

L = 8
V = len(char_tokenizer())  # 38


@pytest.fixture(scope="module")
def soft_teacher(tmp_path_factory):
    """A teacher of the character vocabulary (38 tokens) whose distributions are far from one-hot."""
    d = tmp_path_factory.mktemp("soft_teacher")
    tok = char_tokenizer()
    tiny_llama(len(tok), seed=5, sharpness=4.0).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def states_file(path, teacher, rows, sha=None, prompt_len=0):
    """A states file of rows (ids, masked positions), as `kdtrain sample --states` writes them."""
    tok = char_tokenizer()
    src = StateSource("runs/x", 7, sha or tokenizer_hash(tok), {"steps": 4})
    recs = [StateRecord(f"s{j:06d}-t001", ids, prompt_len, m, 1, 4, src) for j, (ids, m) in enumerate(rows)]
    return write_states(path, recs)


def build(tmp_path, teacher, states, out="o", **kw):
    base = dict(states=str(states), teacher=str(teacher), out=str(tmp_path / out), seq_len=L, progress=False)
    return run_build(BuildConfig(**{**base, **kw}))


ROW = [1, 10, 0, 12, 9, 0, 14, 11]  # BOS, and two masked positions (2, 5) holding the student's own tokens
MASKED = [2, 5]


def test_mc_targets_on_a_state_converge_to_the_teachers_marginal_given_its_visible_tokens(soft_teacher, tmp_path):
    """Each masked position's target (importance weights, full-conditional scores: the consistent estimator)
    against the teacher's conditional of that position given the state's visible tokens, by enumerating every
    completion of the state's masked positions; the tokens the student left there are never read."""
    a = states_file(tmp_path / "a.jsonl", soft_teacher, [(ROW[:2] + [20] + ROW[3:5] + [21] + ROW[6:], MASKED)])
    b = states_file(tmp_path / "b.jsonl", soft_teacher, [(ROW[:2] + [30] + ROW[3:5] + [31] + ROW[6:], MASKED)])
    kw = dict(mode="mc", k=1500, mc_weights="importance", mc_score="full-conditional", rescore_k=V, top_n=V)
    kw.update(logprob_dtype="float32")
    build(tmp_path, soft_teacher, a, "a", **kw)
    build(tmp_path, soft_teacher, b, "b", **kw)
    da, db = (read_shard(next((tmp_path / o).glob("part-*.parquet"))) for o in "ab")
    assert np.array_equal(da.target_ids, db.target_ids) and np.array_equal(da.target_logprobs, db.target_logprobs)
    assert da.row_masks(0).tolist() == MASKED and da.t[0] == pytest.approx(2 / 7)
    model = TorchTeacher.load(soft_teacher, "cpu", "float32").model
    limits = exact_limits(model, torch.tensor(ROW), MASKED, V=V)
    for p, i in enumerate(MASKED):
        e0, e1 = da.entry_offsets[p], da.entry_offsets[p + 1]
        got = dense(torch.tensor(da.target_ids[e0:e1]), torch.tensor(da.target_logprobs[e0:e1]), V)
        want = limits[i][("importance", "full-conditional")]
        assert tv(got, want) < 0.04 < 0.1 < tv(got, limits[i][("importance", "next-token")])
    m = Manifest.load(tmp_path / "a")
    assert m.states["run"] == "runs/x" and m.states["step"] == 7 and m.mask_dependent_targets
    assert validate_dir(tmp_path / "a")


def test_topk_targets_on_a_state_condition_on_the_students_completion(soft_teacher, tmp_path):
    row = [1, 10, 20, 12, 9, 21, 14, 11]
    f = states_file(tmp_path / "s.jsonl", soft_teacher, [(row, MASKED)])
    build(tmp_path, soft_teacher, f, mode="topk", k=3, window="all", top_n=4, logprob_dtype="float32")
    data = read_shard(next((tmp_path / "o").glob("part-*.parquet")))
    model = TorchTeacher.load(soft_teacher, "cpu", "float32").model
    ((cand, logq),) = rescore_naive(model, torch.tensor([row]), [torch.tensor(MASKED)], 3, None)
    for p in range(2):
        e0, e1 = data.entry_offsets[p], data.entry_offsets[p + 1]
        want = {int(c): float(q) for c, q in zip(cand[p], logq[p]) if q > -np.inf}
        assert {int(i): pytest.approx(want[int(i)], abs=1e-5) for i in data.target_ids[e0:e1]} == {
            int(i): float(q) for i, q in zip(data.target_ids[e0:e1], data.target_logprobs[e0:e1])
        }


def test_states_that_do_not_fit_are_refused_in_one_line(soft_teacher, tmp_path):
    f = states_file(tmp_path / "other.jsonl", soft_teacher, [(ROW, MASKED)], sha="f" * 64)
    with pytest.raises(UserError, match="states from another tokenizer"):
        build(tmp_path, soft_teacher, f, mode="mc", k=2)
    f = states_file(tmp_path / "ok.jsonl", soft_teacher, [(ROW, MASKED)])
    with pytest.raises(UserError, match="its rows are 8 tokens; pass --seq-len 8"):
        build(tmp_path, soft_teacher, f, mode="mc", k=2, seq_len=12)
    bad = tmp_path / "none.jsonl"
    line = json.loads(f.read_text())
    bad.write_text(json.dumps({**line, "mask_positions": []}) + "\n")
    with pytest.raises(UserError, match="line 1: state s000000-t001 has no masked position"):
        build(tmp_path, soft_teacher, bad, mode="mc", k=2)
    with pytest.raises(UserError, match="give a corpus or --states, not both"):
        BuildConfig(states=str(f), corpus=str(tmp_path)).check()
    assert not (tmp_path / "o" / "manifest.json").exists()  # refused before the folder was touched
