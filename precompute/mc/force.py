"""A vLLM V1 logits processor that forces chosen tokens at chosen output steps ("forced decoding").

A request opts in with ``SamplingParams(extra_args={FORCE_KEY: force})``: ``force[s]`` is the token the request
must emit at output step ``s``, or -1 to sample freely there. At a forced step every other logit is set to
-inf, so the sampler emits exactly that token whatever the temperature or seed.

The engine computes the log-probs it returns *before* logits processors run (``logprobs_mode="raw_logprobs"``,
vLLM's default; the engine is started with it explicitly), so a forced token comes back with the model's own
log p(token | prefix). That gives mc, in one generation pass, the completion's masked tokens sampled, its visible
tokens held fixed, and the visible tokens' log-probs (the importance / smc weights).

Registered with ``LLM(logits_processors=[ForceTokens])``; the engine process imports it by this module's path.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ar2mdm.precompute.mc.vllm import FORCE_KEY


class ForceTokens(LogitsProcessor):
    """Per request (batch index -> (force list, live output-token list)): at a forced step, only that token."""

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool) -> None:
        self.reqs: dict[int, tuple[list[int], list[int]]] = {}

    def is_argmax_invariant(self) -> bool:
        return False  # forcing changes even a greedy request's choice

    @staticmethod
    def _state(params, _prompt, output_ids):
        force = (params.extra_args or {}).get(FORCE_KEY)
        return (force, output_ids) if force else None

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self.reqs, batch_update, self._state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        # logits: (B, V) for the requests of this step; output_ids is the request's running output list, so its
        # length is the index of the token this step emits
        rows, toks = [], []
        for i, (force, out) in self.reqs.items():
            s = len(out)
            if s < len(force) and force[s] >= 0:
                rows.append(i)
                toks.append(force[s])
        if rows:
            r = torch.tensor(rows, device=logits.device)
            t = torch.tensor(toks, device=logits.device)
            logits[r] = float("-inf")
            logits[r, t] = 0.0
        return logits
