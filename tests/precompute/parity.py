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
