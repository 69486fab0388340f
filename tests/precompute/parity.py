"""The builds compared between backends (shared by the test and its vLLM subprocess)."""

import numpy as np

from ar2mdm.precompute.config import BuildConfig

BUILDS = {
    "topk": dict(mode="topk", k=4, window=6),
    "fim": dict(mode="fim", window=8),
    "mc_next_uniform": dict(mode="mc", k=256, mc_score="next-token", mc_weights="uniform"),
    "mc_full_importance": dict(
        mode="mc", k=64, mc_score="full-conditional", mc_weights="importance", rescore_k=4, window=4
    ),
}


def build_config(name, teacher, corpus, out, backend) -> BuildConfig:
    return BuildConfig(
        corpus=str(corpus),
        teacher=str(teacher),
        out=str(out),
        backend=backend,
        seq_len=24,
        max_sequences=2,
        seqs_per_shard=2,
        top_n=8,
        logprob_dtype="float32",
        progress=False,
        **BUILDS[name],
    )


# smc on vLLM against exact enumeration: a row whose limits differ at position 4 (uniform vs importance TV 0.57)
SMC_ROW = [1, 10, 0, 20, 0, 8, 5, 12]
SMC_MASKED = [2, 4]
SMC_K = 3000


def smc_estimates(teacher) -> dict:
    """Dense next-token estimates of SMC_ROW from a backend: smc (forced resampling), importance, and smc with
    resampling off at small K (which must equal importance draw for draw)."""
    from ar2mdm.precompute.mc.particles import McSettings

    out = {}
    runs = [
        ("smc", "smc", SMC_K, 1.0),
        ("importance", "importance", SMC_K, 0.5),
        ("smc_off", "smc", 64, 0.0),
        ("importance_64", "importance", 64, 0.5),
    ]
    for name, weights, K, smc_ess in runs:
        s = McSettings(k=K, score="next-token", weights=weights, top_n=64, rescore_k=8, smc_ess=smc_ess)
        res = teacher.mc_batch([SMC_ROW], [SMC_MASKED], [5], s)[0]
        out[name] = {
            "ids": [i.tolist() for i in res.ids],
            "logprobs": [lp.tolist() for lp in res.logprobs],
            "ess": res.ess,
            "resamples": len(res.ess_before),
        }
    return out


# the forcing processor: a row generated from its first token with these steps forced (-1: sampled)
FORCE_ROW = [1, 10, 3, 20, 7, 8, 5, 12, 9, 30, 2, 4]
FORCE = [-1, 20, 7, 8, -1, -1, 12, 9, 30, 2, 4]


def forced_decoding(teacher) -> dict:
    """vLLM only: tokens and log-probs of forced generations (4 seeds), the same sequences' prompt log-probs, and
    topk targets of two rows by both plans (the cached plan twice)."""
    import torch
    from vllm import SamplingParams

    from ar2mdm.precompute.mc.vllm import FORCE_KEY
    from ar2mdm.precompute.topk import rescore

    prompt = FORCE_ROW[:1]
    outs = teacher._generate(
        [prompt] * 4,
        [
            SamplingParams(
                max_tokens=len(FORCE),
                logprobs=3,
                seed=s,
                ignore_eos=True,
                detokenize=False,
                extra_args={FORCE_KEY: FORCE},
            )
            for s in range(4)
        ],
    )
    gen = [
        {
            "tokens": list(o.outputs[0].token_ids),
            "logprobs": [o.outputs[0].logprobs[s][t].logprob for s, t in enumerate(o.outputs[0].token_ids)],
        }
        for o in outs
    ]
    seqs = [prompt + g["tokens"] for g in gen]
    check = teacher._generate(seqs, SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False))
    prompt_lp = [[c.prompt_logprobs[j][x[j]].logprob for j in range(1, len(x))] for x, c in zip(seqs, check)]
    # topk on rows longer than two KV blocks (32 tokens on CPU), so that the branches read the prefix cache
    g = np.random.default_rng(3)
    rows = [g.integers(3, 40, 80).tolist() for _ in range(2)]
    positions = [[5, 40, 60], [33, 62]]  # 60, 62: a branch fills the block holding i (cached whole next time)
    topk = {}
    for plan in ("prompt", "cached", "cached"):  # the second cached call finds its branches cached (asked again)
        c0 = teacher.counters()
        scorer = teacher.scorer(read_cache=plan == "cached")
        res = rescore(scorer, torch.tensor(rows), [torch.tensor(p) for p in positions], k=4, window=6)
        c1 = teacher.counters()
        topk.setdefault(plan, []).append(
            {
                "res": [[c.tolist(), lq.tolist()] for c, lq in res],
                "cached_tokens": c1["prompt_tokens_cached"] - c0["prompt_tokens_cached"],
            }
        )
    return {"generated": gen, "prompt_logprobs": prompt_lp, "topk": topk}
