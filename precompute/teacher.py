"""Loading the AR teacher for the torch backend, and describing it for the manifest."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import numpy as np

from ar2mdm.schemas import TeacherInfo, TokenizerInfo
from ar2mdm.shared.defaults import default_teacher
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.hfmodel import first_line as _first_line
from ar2mdm.shared.hfmodel import quiet_transformers
from ar2mdm.shared.hfmodel import resolve_model as resolve_teacher  # noqa: F401  (the build's name for it)
from ar2mdm.shared.tokenizer import special_ids, tokenizer_hash

if TYPE_CHECKING:
    from ar2mdm.precompute.topk import Scorer

# config keys that say how a file was loaded, not what the model computes
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "quantization_config", "dtype", "torch_dtype")


def config_sha256(config) -> str:
    d = {k: v for k, v in config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()


def load_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"teacher {folder}: tokenizer does not load: {_first_line(e)}") from e


def tokenizer_info(tokenizer, vocab_size: int) -> TokenizerInfo:
    bos, eos = special_ids(tokenizer)
    return TokenizerInfo(sha256=tokenizer_hash(tokenizer), vocab_size=vocab_size, bos_id=bos, eos_id=eos)


def teacher_config(folder: Path):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(folder)
    except Exception as e:
        raise UserError(f"teacher {folder} does not load: {_first_line(e)}") from e


def teacher_info(spec: str | None, folder: Path, weights_sha: str, config) -> TeacherInfo:
    arch = (getattr(config, "architectures", None) or [config.model_type])[0]
    max_pos = getattr(config, "max_position_embeddings", None) or 0
    return TeacherInfo(
        path=str(spec) if spec else str(default_teacher()),
        architecture=arch,
        weights_sha256=weights_sha,
        config_sha256=config_sha256(config),
        max_positions=int(max_pos),
    )


def auto_dtype(device: str, config) -> str:
    """--dtype auto: float32 on the CPU; on CUDA float16, whose 10-bit mantissa keeps targets near fp32 (topk mean
    TV 0.003 against bf16's 0.018 on the default teacher: docs/scaling.md, "Numerics"), except for the Gemma
    family, trained in bf16 with activations beyond float16's range. A NaN output stops the build with a pointer
    to --dtype bfloat16 (`forward.check_finite`)."""
    if not device.startswith("cuda"):
        return "float32"
    return "bfloat16" if "gemma" in str(getattr(config, "model_type", "")).lower() else "float16"


class Backend(Protocol):
    """What the build asks of a teacher backend (`TorchTeacher`, `vllm_backend.VllmTeacher`): teacher computations
    only, the same for every mode file that calls them, so neither the build nor a mode knows which one it drives."""

    device: str
    whole_shard: bool  # the build hands over a whole shard per call (else --batch-size sequences)

    def scorer(self, token_budget: int) -> "Scorer":
        """topk's first pass and branch log-likelihoods (`topk.Scorer`)."""
        ...

    def next_token_top(self, prompts: list[list[int]], top_n: int, token_budget: int) -> tuple:
        """fim: the top-n ids (Q, n) and log-probs (Q, n) of p_T(. | prompt) after each prompt."""
        ...

    def mc_batch(self, rows, masks, seeds: list[int], s, *, block_size=None, on_step=None) -> list:
        """mc: per row its `estimators.McTargets` (s: `particles.McSettings`; on_step(n) as masked positions are
        drawn)."""
        ...

    def close(self) -> None: ...


@dataclass
class TorchTeacher:
    """The torch backend: a causal LM loaded with transformers, in eval mode.

    A `Backend`: the build hands each call a batch of rows, ``--batch-size`` sequences here.
    """

    model: object
    device: str
    dtype: str
    tree_mask: str = "dense"  # topk's packed tree mask: dense (SDPA) | flex (FlexAttention)
    decoders: dict = field(default_factory=dict, repr=False)  # mc: one decoder per row length, kept across batches
    whole_shard = False  # the build hands this backend --batch-size sequences per call

    @classmethod
    def load(cls, folder: Path, device: str = "auto", dtype: str = "auto", tree_mask: str = "dense") -> "TorchTeacher":
        import torch
        from transformers import AutoModelForCausalLM

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = auto_dtype(device, teacher_config(folder))
        quiet_transformers()
        try:
            model = AutoModelForCausalLM.from_pretrained(
                folder, dtype=getattr(torch, dtype), attn_implementation="sdpa"
            )
        except Exception as e:
            raise UserError(f"teacher {folder} does not load: {_first_line(e)}") from e
        model.to(device).eval()
        from ar2mdm.precompute.forward import check_head_path

        check_head_path(model)  # topk/fim apply the head themselves: it must be the model's own
        return cls(model=model, device=device, dtype=dtype, tree_mask=tree_mask)

    def scorer(self, token_budget: int):
        from ar2mdm.precompute.tree import TorchScorer

        return TorchScorer(self.model, token_budget, self.tree_mask)

    def next_token_top(self, prompts: list[list[int]], top_n: int, token_budget: int):
        from ar2mdm.precompute.forward import last_token_top

        return last_token_top(self.model, prompts, top_n, token_budget)

    def mc_batch(self, rows, masks, seeds: list[int], s, *, block_size=None, on_step=None):
        """MC targets of several rows, all their particles advancing together (see `particles`, `estimators`)."""
        import torch

        from ar2mdm.precompute.decode import decoder_for
        from ar2mdm.precompute.mc.estimators import mc_targets

        xs = torch.as_tensor(np.stack(rows), dtype=torch.long, device=self.device)
        L = xs.shape[1]
        if L not in self.decoders:
            self.decoders[L] = decoder_for(self.model, L)
        return mc_targets(
            self.model, xs, masks, seeds, s, block_size=block_size, on_step=on_step, decoder=self.decoders[L]
        )

    def close(self) -> None:
        pass
