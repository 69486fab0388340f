"""An ar2mdm student as a model of EleutherAI's LM Evaluation Harness (``lm-eval``, the optional ``eval`` extra).

Registered as ``ar2mdm``: ``model_args`` ``pretrained=`` a kdtrain run folder or an exported folder, either student
kind. The harness's three requests:

- ``loglikelihood``: `likelihood.score` (``likelihood=chain``, the default: exact, left to right; ``elbo``: LLaDA's
  Monte Carlo bound over ``mc_num`` masks, its standard error logged);
- ``loglikelihood_rolling`` (perplexity tasks): the text cut into windows of ``max_length`` tokens (default: the
  rows the student trained on), each scored as a continuation of the window before it, as the harness's ``hf``
  model does;
- ``generate_until``: the student's own sampler (a block student: `block_sampler.block_generate` with
  ``threshold``/``per_forward``; a full-attention one: `denoise.denoise` with ``steps``/``remasking``/
  ``span_length``), greedy where the task asks (``do_sample`` false or temperature 0), cut at the task's stop
  strings; tokens per forward logged.

Every text starts after BOS, as the rows the student trained on; a row longer than the student's positions keeps its
newest tokens. ``ar2mdm-lm-eval ARGS`` is the harness's own command line with this model registered
(`lm_eval_run.main`); `kdtrain lm-eval` runs a student beside its teacher.
"""

from __future__ import annotations

import logging
from pathlib import Path

import lm_eval.models  # noqa: F401  (the harness's own models first: its registry loads them only while empty)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from ar2mdm.shared.errors import UserError
from ar2mdm.train.likelihood import score

log = logging.getLogger("lm_eval.models.ar2mdm")  # under the harness's logger: its command line shows it

# the settings a model_args string may hold, with their defaults; anything else is refused in one line
MODEL_ARGS = {
    "pretrained": None,
    "likelihood": "chain",
    "mc_num": 32,
    "max_length": None,
    "max_gen_toks": 256,
    "threshold": 0.9,
    "per_forward": None,
    "steps": None,
    "remasking": "low-confidence",
    "span_length": None,
    "temperature": 0.0,
    "seed": 0,
    "device": "auto",
    "batch_size": 1,
}
GEN_KWARGS = {"until", "max_gen_toks", "do_sample", "temperature"}  # what generate_until reads of a task's


def load_any(path: Path, device: str):
    """(student, tokenizer, the row length it trained on) from a kdtrain run folder or an exported folder."""
    from transformers import AutoTokenizer

    from ar2mdm.train.checkpoint import CKPT, load_student, run_tokenizer

    if (path / CKPT).exists():
        model, meta = load_student(path, device)
        return model, run_tokenizer(path), meta.get("seq_len")
    if (path / "config.json").exists():
        from transformers import AutoModelForMaskedLM

        wrapper = AutoModelForMaskedLM.from_pretrained(path, trust_remote_code=True)
        return wrapper.student.to(device).eval(), AutoTokenizer.from_pretrained(path), wrapper.config.ar2mdm["seq_len"]
    raise UserError(
        f"pretrained={path}: neither a kdtrain run (no checkpoint/) nor an exported student (no config.json)"
    )


@register_model("ar2mdm")
class StudentLM(TemplateLM):
    def __init__(self, **kwargs):
        super().__init__()
        unknown = sorted(set(kwargs) - set(MODEL_ARGS) - {"max_batch_size"})
        if unknown:
            raise ValueError(f"ar2mdm model_args: {', '.join(unknown)} not supported (known: {', '.join(MODEL_ARGS)})")
        args = {**MODEL_ARGS, **{k: v for k, v in kwargs.items() if v is not None}}
        if args["pretrained"] is None:
            raise ValueError("ar2mdm model_args: pretrained= a kdtrain run folder or an exported student folder")
        if str(args["batch_size"]) not in ("1", "auto"):  # a request is one batch: its chain rows, or its draws
            raise ValueError(f"ar2mdm model_args: batch_size={args['batch_size']}: requests are scored one at a time")
        if args["likelihood"] not in ("chain", "elbo"):
            raise ValueError(f"ar2mdm model_args: likelihood={args['likelihood']} must be chain or elbo")
        from ar2mdm.train.device import resolve_device

        self.args = args
        self._device = resolve_device(str(args["device"]))
        self.model, self.tokenizer, seq_len = load_any(Path(args["pretrained"]), self._device)
        self.max_length = int(args["max_length"] or seq_len or self.model.config.max_positions)
        self.g = torch.Generator().manual_seed(int(args["seed"]))
        self.forwards = self.generated = 0  # generate_until's, for tokens per forward

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_token_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """BOS + the string's ids (without BOS where ``add_special_tokens`` is False)."""
        ids = self.tokenizer(string, add_special_tokens=False)["input_ids"]
        return ids if add_special_tokens is False else [self.prefix_token_id, *ids]

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out, ses = [], []
        for _, context, continuation in tqdm(requests, desc="ar2mdm loglikelihood", disable=disable_tqdm):
            # too long for the student's positions: the newest tokens, and at least one before the scored ones
            cut = max(0, len(context) + len(continuation) - self.model.config.max_positions)
            s = score(
                self.model,
                (context + continuation)[cut:],
                max(1, len(context) - cut),
                likelihood=self.args["likelihood"],
                draws=int(self.args["mc_num"]),
                g=self.g,
            )
            out.append((s.logprob, s.greedy))
            ses.append(s.se)
        if self.args["likelihood"] == "elbo" and ses:
            log.info(
                "ar2mdm elbo: mean standard error %.3f nats over %d draws a request",
                sum(ses) / len(ses),
                self.args["mc_num"],
            )
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for (text,) in tqdm([r.args for r in requests], desc="ar2mdm rolling", disable=disable_tqdm):
            windows = get_rolling_token_windows(
                token_list=self.tok_encode(text, add_special_tokens=False),
                prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length,
                context_len=1,
            )
            pairs = [make_disjoint_window(w) for w in windows]
            out.append(sum(lp for lp, _ in self._loglikelihood_tokens([(None, c, t) for c, t in pairs], True)))
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from ar2mdm.student.block_sampler import block_generate
        from ar2mdm.student.denoise import denoise

        out = []
        for j, (context, gen) in enumerate(
            tqdm([r.args for r in requests], desc="ar2mdm generate", disable=disable_tqdm)
        ):
            unknown = sorted(set(gen) - GEN_KWARGS)
            if unknown:
                raise ValueError(
                    f"ar2mdm generate_until: {', '.join(unknown)} not supported (reads {', '.join(sorted(GEN_KWARGS))})"
                )
            until = [gen["until"]] if isinstance(gen.get("until"), str) else list(gen.get("until") or [])
            greedy = not gen.get("do_sample", False) or float(gen.get("temperature", 0) or 0) == 0
            temperature = 0.0 if greedy else float(gen.get("temperature", self.args["temperature"]))
            most = self.model.config.max_positions
            n = min(int(gen.get("max_gen_toks", self.args["max_gen_toks"])), most - 1)
            prompt = self.tok_encode(context)[-(most - n) :]  # the newest context that leaves room for n tokens
            x = torch.tensor([prompt], device=self._device)
            # the sampler stops after the block that holds EOS or a stop string of one token ("\n"): the text is cut
            # there anyway
            one = [self.tok_encode(u, add_special_tokens=False) for u in until]
            stops = (self.eot_token_id, *(t[0] for t in one if len(t) == 1))
            seeds = [int(self.args["seed"]) + j]
            if self.model.config.block_size is not None:
                rows, forwards = block_generate(
                    self.model,
                    x,
                    n,
                    threshold=float(self.args["threshold"]),
                    per_forward=self.args["per_forward"] and int(self.args["per_forward"]),
                    temperature=temperature,
                    seeds=seeds,
                    stop_ids=stops,
                )
            else:
                masks = torch.full((1, n), self.model.config.mask_id, device=self._device)
                rows, forwards = denoise(
                    self.model,
                    torch.cat([x, masks], 1),
                    int(self.args["steps"] or n),
                    temperature=temperature,
                    remasking=self.args["remasking"],
                    seeds=seeds,
                    span_length=self.args["span_length"] and int(self.args["span_length"]),
                    stop_ids=stops,
                    return_forwards=True,
                )
            written = [t for t in rows[0, len(prompt) :].tolist() if t < self.model.config.vocab_size]
            self.forwards += int(forwards[0])
            self.generated += len(written)  # what the sampler wrote (a block after a stop stays masked)
            ids = written[: written.index(self.eot_token_id)] if self.eot_token_id in written else written
            text = self.tokenizer.decode(ids)
            for stop in until:
                text = text.split(stop)[0] if stop else text
            out.append(text)
        if self.forwards:
            log.info("ar2mdm generate_until: %.2f tokens per forward", self.generated / self.forwards)
        return out
