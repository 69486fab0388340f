"""scripts/quality_curve.py: arms paired sample by sample against a base label, and read at matched entropy."""

import math
import runpy
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "quality_curve.py"


def scored_file(nll: list[float], nbytes: list[int], entropy: float) -> dict:
    per = [{"index": i, "j": {"nll": n, "tokens": 5, "bytes": b}} for i, (n, b) in enumerate(zip(nll, nbytes))]
    total = sum(nll) / math.log(2) / sum(nbytes)
    return {"per_sample": per, "judges": {"j": {"bits_per_byte": total}}, "text": {"entropy": entropy}}


def test_paired_deltas_match_a_per_sample_computation_and_matched_entropy_reads_the_line():
    s = runpy.run_path(str(SCRIPT))
    rng = np.random.default_rng(0)
    files, scored, bpb = {}, [], {}
    for label, shift in (("base", 0.0), ("arm", 0.3)):
        for run in (0, 1):
            for T, H in ((0.8, 3.0 + shift), (1.0, 3.4 + shift)):
                nbytes = rng.integers(20, 60, size=6).tolist()
                nll = (rng.uniform(1, 2, size=6) * np.array(nbytes)).tolist()
                if label == "arm" and run == 1:
                    nll[2] = 0.0  # an empty judge score: left out of the pairs
                    nbytes[2] = 0
                name = f"{label}-{run}-{T}"
                files[name] = dict(label=label, run=f"r{run}", setting="τ=0.9", temperature=T)
                scored.append(scored_file(nll, nbytes, H))
                bpb[(label, run, T)] = [n / math.log(2) / b if b else None for n, b in zip(nll, nbytes)]
    out = s["paired"](files, scored, "base", ["j"])
    assert {(p["label"], p["temperature"]) for p in out} == {("arm", 0.8), ("arm", 1.0)}
    for p in out:
        T = p["temperature"]
        want = [a - b for r in (0, 1) for a, b in zip(bpb[("arm", r, T)], bpb[("base", r, T)]) if a is not None]
        assert p["pairs"] == len(want) == 11
        assert p["delta"] == pytest.approx(np.mean(want))
        assert p["se"] == pytest.approx(np.std(want, ddof=1) / math.sqrt(len(want)))
    rows = [
        {**w, "j_bpb": f["judges"]["j"]["bits_per_byte"], "entropy": f["text"]["entropy"]}
        for w, f in zip(files.values(), scored)
    ]
    arm = {T: np.mean([r["j_bpb"] for r in rows if r["label"] == "arm" and r["temperature"] == T]) for T in (0.8, 1.0)}
    # the arm's entropies are 3.3 and 3.7: at 3.4 it is a quarter of the way from T = 0.8 to T = 1
    assert s["matched"](rows, "arm", "j", 3.4) == pytest.approx(arm[0.8] + 0.25 * (arm[1.0] - arm[0.8]))
