"""`kdtrain sample`: a student's samples, drawn in batches, as records of the samples schema.

The prompts come from `shared.sampling` (one, a file of them, or held-out rows), the sampler is `denoise` (a
full-attention student) or `block_sampler.block_generate` (a block student), and each sample draws from its own
seed, so the same command writes the same file whatever the batch size.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ar2mdm.schemas.samples import SampleRecord, SampleSource
from ar2mdm.schemas.states import StateRecord, StateSource
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.sampling import Prompt, batches_of, prompts_for, sample_record, sample_seed, source_settings
from ar2mdm.student.block_sampler import block_generate
from ar2mdm.student.denoise import denoise, planned_steps
from ar2mdm.train.checkpoint import checkpoint_dir, load_student, run_task, run_tokenizer
from ar2mdm.train.config import SampleConfig
from ar2mdm.train.device import resolve_device

# the sampler's settings a samples file records (with the prompts' source): a full-attention student's, a block
# student's
SAMPLER_FIELDS = ("length", "steps", "temperature", "remasking", "span_length", "seed")
BLOCK_SAMPLER_FIELDS = ("length", "threshold", "per_forward", "temperature", "seed")


def chat_template_for(meta: dict, tokenizer) -> bool:
    """Whether a user's prompt goes through the chat template: as the build rendered this run's rows (plain
    `prompt` rows: no), and where the run does not say, whenever the tokenizer has a template."""
    if run_task(meta)[1] == "plain":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def prompt_row(meta: dict, tok, prompt: str, chat: bool) -> list[int]:
    """The ids a generation starts from: BOS + the prompt, through the chat template as the build rendered this
    run's rows when ``chat``."""
    from ar2mdm.shared.tokenizer import text_row, user_prompt_row

    if chat:
        return user_prompt_row(tok, prompt, chat_template_for(meta, tok))
    return text_row(tok, prompt)


def run_step(run: Path) -> int | None:
    """The training step of a run's checkpoint (None for checkpoints that do not record it)."""
    return json.loads((checkpoint_dir(run) / "config.json").read_text()).get("step")


def state_steps(seed: int, index: int, total: int, keep: int) -> list[int]:
    """The steps of sample ``index``'s trajectory whose input states are kept: ``keep`` of its ``total`` steps,
    uniformly without replacement. The linear schedule masks 1 - s/total of the positions before step s, so the
    kept states spread over noise levels as the corpus rows' t ~ U(0, 1) do."""
    return sorted(random.Random(sample_seed(seed, index) + 1).sample(range(total), min(keep, total)))


@dataclass
class Sampling:
    """What `sample`'s loop needs: the student, its tokenizer, the prompts and the records' sources."""

    model: torch.nn.Module
    tok: object
    chat: bool
    prompts: list[Prompt]
    stops: list[int]  # what ends a sample: the end of turn (chat) or EOS
    eos: int
    source: SampleSource
    state_source: StateSource


def setup_sampling(cfg: SampleConfig) -> Sampling:
    """Load the run's student and tokenizer, refuse what it cannot sample, and make the prompts."""
    from ar2mdm.shared.tokenizer import special_ids, stop_ids, tokenizer_hash

    cfg.check()
    run = Path(cfg.run)
    model, meta = load_student(run, resolve_device(cfg.device))
    tok = run_tokenizer(run)
    chat = run_task(meta)[0] == "sft" if cfg.chat is None else cfg.chat
    block_student = model.config.block_size is not None
    if chat and cfg.prompts_from:
        raise UserError("--prompts-from gives plain-text prompts; a chat student takes --prompt or --prompts")
    cfg.check_kind(block_student)
    if block_student and cfg.states:
        raise UserError("--states keeps a full-attention student's states; a block student samples block by block")
    prompts = prompts_for(cfg, tok, cfg.length, lambda text: prompt_row(meta, tok, text, chat))
    longest = max(len(p.ids) for p in prompts)
    if longest + cfg.length > model.config.max_positions:
        raise UserError(
            f"prompt ({longest} tokens) + --length {cfg.length} exceeds the student's "
            f"{model.config.max_positions} positions"
        )
    eos = special_ids(tok)[1]
    settings = source_settings(cfg, BLOCK_SAMPLER_FIELDS if block_student else SAMPLER_FIELDS)
    source = SampleSource("student", str(run), tokenizer_hash(tok), run_step(run), settings)
    state_settings = {**settings, "states_per_sample": cfg.states_per_sample}
    return Sampling(
        model=model,
        tok=tok,
        chat=chat,
        prompts=prompts,
        stops=stop_ids(tok) if chat else [eos],
        eos=eos,
        source=source,
        state_source=StateSource(str(run), source.step, source.tokenizer_sha256, state_settings),
    )


def draw_batch(s: Sampling, cfg: SampleConfig, batch: list[int], keep: dict[int, list[int]]):
    """The rows (B, P + length) of the samples ``batch`` (indices into the prompts, of one length), the forwards
    each needed (B,), and the masked positions of the states ``keep`` asks for, by (sample, step)."""
    model, device = s.model, s.model.model.embed_tokens.weight.device
    seeds = [sample_seed(cfg.seed, i) for i in batch]
    prompt = torch.tensor([s.prompts[i].ids for i in batch], device=device)  # (B, P)
    if model.config.block_size is not None:
        x, forwards = block_generate(
            model,
            prompt,
            cfg.length,
            threshold=cfg.threshold,
            per_forward=cfg.per_forward,
            temperature=cfg.temperature,
            seeds=seeds,
            stop_ids=tuple(s.stops),
        )
        return x, forwards, {}
    seen: dict[tuple[int, int], list[int]] = {}

    def record(step: int, rows: torch.Tensor) -> None:  # the states the trajectories visit
        for b, i in enumerate(batch):
            if step in keep.get(i, ()):
                seen[i, step] = (rows[b] == model.config.mask_id).nonzero()[:, 0].tolist()

    masks = torch.full((len(batch), cfg.length), model.config.mask_id, device=device)
    x, forwards = denoise(
        model,
        torch.cat([prompt, masks], dim=1),
        cfg.steps,
        temperature=cfg.temperature,
        remasking=cfg.remasking,
        seeds=seeds,
        span_length=cfg.span_length,
        stop_ids=tuple(s.stops) if s.chat else (),
        on_step=record,
        return_forwards=True,
    )
    return x, forwards, seen


@torch.no_grad()
def sample(cfg: SampleConfig) -> tuple[list[SampleRecord], list[StateRecord]]:
    """``cfg.num`` samples of the run's student, in batches of ``cfg.batch_size``: a full-attention student draws
    with `denoise` (``steps``, ``remasking``, ``span_length``), a block student block by block with
    `block_sampler.block_generate` (``threshold``, ``per_forward``). Each record counts the forwards that drew it.
    With ``cfg.states`` (full-attention students), also ``cfg.states_per_sample`` of the states each trajectory
    visited (`state_steps`).

    A chat run (``chat``, default: on for SFT runs) renders each prompt as a user turn, as the build rendered
    its rows, and ends each answer at its first end of turn; other runs end a sample at its first EOS (where a
    document ends). The completion is what precedes the stop; ``stopped`` says whether there was one.
    """
    s = setup_sampling(cfg)
    mask = s.model.config.mask_id
    total = planned_steps(cfg.length, cfg.steps, cfg.span_length)
    records: list[SampleRecord | None] = [None] * len(s.prompts)
    states: list[StateRecord] = []
    for batch in batches_of(s.prompts, cfg.batch_size):
        keep = {i: state_steps(cfg.seed, i, total, cfg.states_per_sample) for i in batch} if cfg.states else {}
        x, forwards, seen = draw_batch(s, cfg, batch, keep)
        for b, (i, row) in enumerate(zip(batch, x.tolist())):
            p = s.prompts[i]
            records[i] = sample_record(
                i, p, row[len(p.ids) :], s.tok, stops=s.stops, source=s.source, forwards=int(forwards[b])
            )
            final = [s.eos if t == mask else t for t in row]  # (what a sampler left masked after every answer ended)
            plen = len(p.ids) if s.chat else 0  # a chat row's prompt is its SFT prompt; else BOS is all
            for step in keep.get(i, ()):
                if (i, step) in seen:  # (not a step after every answer of the batch had ended)
                    states.append(
                        StateRecord(
                            example_id=f"s{i:06d}-t{step:03d}",
                            input_ids=final,
                            prompt_len=plen,
                            mask_positions=seen[i, step],
                            step=step,
                            steps=total,
                            source=s.state_source,
                        )
                    )
    return records, states
