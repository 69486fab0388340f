"""The transformers wrapper `kdtrain export` ships beside the rest of the student package: the student as an
``AutoModelForMaskedLM`` with ``trust_remote_code=True``, and its samplers as ``diffusion_generate``.

It imports its siblings relatively, so the same file serves inside ar2mdm and in an exported folder, where
transformers copies the files it imports beside it. It is never imported by ar2mdm itself.
"""

from __future__ import annotations

import torch
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .block_sampler import block_generate
from .denoise import cut_at_stop, denoise
from .model import Student, StudentConfig


class Ar2mdmConfig(PretrainedConfig):
    """``student``: the StudentConfig fields; ``mask_token_id`` = student vocab_size (one past the tokenizer's)."""

    model_type = "ar2mdm_student"

    def __init__(self, student=None, mask_token_id=None, stop_token_ids=None, chat=False, **kwargs):
        self.student = dict(student or {})
        self.mask_token_id = mask_token_id
        self.stop_token_ids = list(stop_token_ids or [])  # what ends an answer (EOS, the template's end of turn)
        self.chat = chat  # trained on chats (--task sft): diffusion_generate stops at the end of turn
        super().__init__(**kwargs)


class Ar2mdmForMaskedLM(PreTrainedModel):
    """A masked diffusion LM distilled by ar2mdm: p_θ(x_0 | x_t) at every position; a full-attention student, or a
    block student (causal across blocks of ``student["block_size"]`` tokens, bidirectional inside one)."""

    config_class = Ar2mdmConfig
    base_model_prefix = "student"
    _no_split_modules = ["DecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.student = Student(StudentConfig(**config.student))
        self.post_init()

    def _init_weights(self, module):
        Student._init(module)

    def forward(self, input_ids, attention_mask=None, context_ids=None, **kwargs):
        """Logits (B, L, V) for ids (B, L) in which masked positions hold ``config.mask_token_id``.

        A full-attention student attends to the whole row, so padding is refused. A block student predicts each
        block given the blocks before it as ``context_ids`` holds them (default ``input_ids``, right where the
        blocks before each masked one are revealed, as in generation)."""
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("this student attends to the whole row: pass rows without padding")
        context = input_ids if context_ids is None else context_ids
        return MaskedLMOutput(logits=self.student(input_ids, context=context))

    @torch.no_grad()
    def diffusion_generate(
        self,
        input_ids,
        max_new_tokens=32,
        *,
        steps=32,
        temperature=1.0,
        remasking="random",
        seed=0,
        span_length=None,
        stop_at_end_of_turn=None,
        threshold=0.9,
        per_forward=None,
        return_forwards=False,
    ):
        """Append ``max_new_tokens`` masks to each row of ``input_ids`` (B, P) (prompts of one length) and fill
        them with ``kdtrain sample``'s samplers; row b draws with seed ``seed + b``. A full-attention student:
        ``denoise`` in ``steps`` steps (by default the student's own distribution, random order at temperature 1;
        ``remasking="low-confidence", temperature=0``: LLaDA's greedy decoding; ``span_length``: span by span).
        A block student: ``block_generate``, each forward revealing the positions whose top probability exceeds
        ``threshold`` (at least one) or ``per_forward`` of them. ``stop_at_end_of_turn`` (default: on for a chat
        student, trained with --task sft): an answer ends at its first end-of-turn/EOS token
        (``config.stop_token_ids``), which is kept; the positions after it hold the pad token (EOS). Returns
        (B, P + n) ids, n <= max_new_tokens; with ``return_forwards``, also the forwards of the model each row
        needed (B,), every forward counted (a full-attention student: the steps it took, at most ``steps`` and
        ``max_new_tokens``), so tokens per forward is n / forwards."""
        stop = self.config.chat if stop_at_end_of_turn is None else stop_at_end_of_turn
        stops = tuple(self.config.stop_token_ids or ()) if stop else ()
        B, P = input_ids.shape
        seeds = [seed + b for b in range(B)]
        if self.student.config.block_size is not None:
            x, forwards = block_generate(
                self.student,
                input_ids.long(),
                max_new_tokens,
                threshold=threshold,
                per_forward=per_forward,
                temperature=temperature,
                seeds=seeds,
                stop_ids=stops,
            )
        else:
            masks = torch.full(
                (B, max_new_tokens), self.config.mask_token_id, dtype=torch.long, device=input_ids.device
            )
            x = torch.cat([input_ids.long(), masks], dim=1)
            x, forwards = denoise(
                self.student,
                x,
                steps,
                temperature=temperature,
                remasking=remasking,
                seeds=seeds,
                span_length=span_length,
                stop_ids=stops,
                return_forwards=True,
            )
        out = x if not stops else self._cut_at_stops(x, P, stops)
        return (out, forwards) if return_forwards else out

    def _cut_at_stops(self, x, P, stops):
        """Each row's answer cut after its first stop token, the rest padded with EOS."""
        B = x.shape[0]
        answers = [cut_at_stop(row[P:].tolist(), stops, keep_stop=True) for row in x]
        n = max(len(a) for a in answers)
        pad = self.config.eos_token_id if self.config.eos_token_id is not None else stops[0]
        out = torch.full((B, P + n), pad, dtype=torch.long, device=x.device)
        out[:, :P] = x[:, :P]
        for b, a in enumerate(answers):
            out[b, P : P + len(a)] = torch.tensor(a, dtype=torch.long)
        return out
