"""scripts/compare_targets.py: builds with the same masks compared position by position, by masking level."""

import runpy
from pathlib import Path

import pytest

from ar2mdm.precompute.build import run_build
from ar2mdm.precompute.config import BuildConfig

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "compare_targets.py"


def test_a_build_against_itself_and_against_left_only_targets(tiny_corpus, tiny_teacher, tmp_path):
    s = runpy.run_path(str(SCRIPT))
    kw = dict(corpus=str(tiny_corpus), teacher=str(tiny_teacher), seq_len=16, max_sequences=6, progress=False, k=4)
    run_build(BuildConfig(out=str(tmp_path / "topk"), window="all", **kw))
    run_build(BuildConfig(out=str(tmp_path / "left"), window=0, **kw))
    ref = s["targets_of"](tmp_path / "topk", 6)
    same = s["compare"](ref, ref, 4)
    assert sum(r["positions"] for r in same) == len(ref) > 0
    assert all(r["kl"] == pytest.approx(0, abs=1e-9) for r in same if r["positions"])
    left = s["compare"](ref, s["targets_of"](tmp_path / "left", 6), 4)
    assert sum(r["positions"] for r in left) == len(ref)
    assert max(r["tv"] for r in left if r["positions"]) > 0.05  # the right context moves the targets
    assert all(r["kl"] >= 0 for r in left if r["positions"])
    run_build(BuildConfig(out=str(tmp_path / "other"), **{**kw, "seed": 1}))
    with pytest.raises(SystemExit, match="other masks"):
        s["compare"](ref, s["targets_of"](tmp_path / "other", 6), 4)
