"""The builds compared between backends (shared by the test and its vLLM subprocess)."""

from ar2mdm.precompute.config import BuildConfig

BUILDS = {
    "topk": dict(mode="topk", k=4, window=6),
    "fim": dict(mode="fim", window=8),
    "mc_next_uniform": dict(mode="mc", k=256, mc_score="next-token", mc_weights="uniform"),
    "mc_full_importance": dict(mode="mc", k=64, mc_score="full-conditional", mc_weights="importance", rescore_k=4, window=4),
}


def build_config(name, teacher, corpus, out, backend) -> BuildConfig:
    return BuildConfig(corpus=str(corpus), teacher=str(teacher), out=str(out), backend=backend, seq_len=24,
                       max_sequences=2, seqs_per_shard=2, top_n=8, logprob_dtype="float32", progress=False,
                       **BUILDS[name])  # fmt: skip


# smc on vLLM against exact enumeration: a row whose limits differ at position 4 (uniform vs importance TV 0.57)
SMC_ROW = [1, 10, 0, 20, 0, 8, 5, 12]
SMC_MASKED = [2, 4]
SMC_K = 3000


def smc_estimates(teacher) -> dict:
    """Dense next-token estimates of SMC_ROW from a backend: smc (forced resampling), importance, and smc with
    resampling off at small K (which must equal importance draw for draw)."""
    out = {}
    for name, weights, K, smc_ess in [("smc", "smc", SMC_K, 1.0), ("importance", "importance", SMC_K, 0.5),
                                      ("smc_off", "smc", 64, 0.0), ("importance_64", "importance", 64, 0.5)]:  # fmt: skip
        res = teacher.mc_targets(SMC_ROW, SMC_MASKED, 5, K, "next-token", weights, 1.0, 64, 8, None, 4096, smc_ess)
        out[name] = {"ids": [i.tolist() for i in res.ids], "logprobs": [lp.tolist() for lp in res.logprobs],
                     "ess": res.ess, "resamples": len(res.ess_before)}  # fmt: skip
    return out
