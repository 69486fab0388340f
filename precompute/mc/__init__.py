"""`--mode mc`: Monte Carlo completions of the masked tokens with the visible ones held fixed (docs/mc.md).

`particles` is the sampler (K particles per row in one KV cache, smc resampling); `estimators` turns the particles'
scores and weights into targets; `vllm` and `force` run the same sampler on a vLLM engine.
"""
