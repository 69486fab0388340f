"""`TrainConfig`: every setting of `kdtrain run`, typed, with its checks. The CLI only fills it in."""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, get_args

from ar2mdm.shared.errors import UserError
from ar2mdm.shared.paths import check_output_file, check_output_folder
from ar2mdm.shared.sampling import SampleSettings, check_sample_settings
from ar2mdm.shared.settings import check_settings, setting

if TYPE_CHECKING:
    from ar2mdm.train.objective import Objective

LambdaSchedule = Literal["constant", "linear-decay", "cosine-decay", "linear-warmup"]  # losses.kd_weight
LambdaT = Literal["none", "low-t", "high-t"]
ReportTo = Literal["none", "tensorboard", "wandb"]  # train/tracking.py
LAMBDA_SCHEDULES, LAMBDA_T, REPORT_TO = get_args(LambdaSchedule), get_args(LambdaT), get_args(ReportTo)


@dataclass
class TrainConfig:
    shards: str = setting(dataclasses.MISSING, "A kdtargets output folder.", argument=True)
    out: str | None = setting(None, "Run folder (default: runs/<shards folder name>).")
    student: str = setting("small", "Preset (tiny, small, base, medium) or a JSON file of StudentConfig fields.")
    init_from: str | None = setting(
        None,
        "AR checkpoint to adapt (HF folder, .gguf, 'default': the embedded teacher, or 'code': the fim code "
        "teacher), same tokenizer as the shards.",
    )
    ar_shift: bool | None = setting(
        None,
        "Predict x_i from the hidden state at i-1 (Dream). Default: on with --init-from.",
        flag="--ar-shift/--no-ar-shift",
    )
    # λ: weight of the KD term
    lam: float = setting(0.5, "λ in (1-λ)·MDM + λ·KD.", flag="--lambda", at_least=0, at_most=1)
    # λ over training progress (losses.kd_weight); auto: linear-warmup with --init-from, constant from scratch
    # (docs/results.md: a warm student first adapts to the mask through the MDM term, and KD from step 0 slows
    # that; from scratch, KD from step 0 is what helps)
    lambda_schedule: Literal["auto", LambdaSchedule] = setting(
        "auto",
        "λ over training: auto (linear-warmup with --init-from, else constant) | constant | linear-decay | "
        "cosine-decay | linear-warmup.",
    )
    lambda_t: LambdaT = setting("none", "λ over each row's mask ratio t: none | low-t (2(1-t)) | high-t (2t).")
    temperature: float = setting(1.0, "KD temperature T.", above=0)
    # auto: bucket when the shards keep a truncated support (mc, fim, topk with top_n < K+1), else renormalize
    # (docs/results.md: on mc targets bucket beat renormalize by 0.12 nats/token held out, and made T = 2 usable)
    tail: Literal["auto", "renormalize", "bucket"] = setting(
        "auto",
        "Mass outside the stored support: auto (bucket when the shards have a tail, else renormalize) | renormalize "
        "| bucket (docs/design.md).",
    )
    # elbo: multiply the MDM term by 1/t
    loss_weighting: Literal["seed", "elbo"] = setting(
        "seed", "seed (no weight) | elbo (1/t, LLaDA/MDLM; forced masks corrected)."
    )
    mix: list[str] = setting(
        [],
        "Also train on another shard folder, FOLDER:SHARE (repeatable): SHARE of each batch's rows come from it, the "
        "rest from SHARDS (e.g. targets on a student's states, kdtargets build --states); with --resume, a changed "
        "mixture starts its own data stream while the step and the optimizer state continue.",
    )
    resample_masks: bool = setting(False, "Fresh masks after epoch 0 (shards with --positions all only).")
    allow_partial: bool = setting(False, "Train on a build whose ranks have not all finished (refused by default).")
    # default: epochs x (rows per rank / batch)
    steps: int | None = setting(
        None, "Optimizer steps (default: --epochs over the shards); 0 saves the initial student.", at_least=0
    )
    # stop (with a checkpoint) after this step; the schedule still spans `steps`
    stop_at: int | None = setting(None, "Stop after this step (checkpointed); resume later with --resume.")
    epochs: int = setting(1, "Passes over the shards (when --steps is not given).", at_least=1)
    # auto: a memory setting only; what the optimizer sees stays 16 rows per rank, or --batch-tokens (train/memory.py)
    batch_size: int | Literal["auto"] = setting(
        16,
        "Rows per micro-batch per rank; auto: on CUDA the most whose step fits in the GPU's memory (found by trying), "
        "up to the rows of one optimizer step (16 per rank, or --batch-tokens), --grad-accum making up the rest.",
        at_least=1,
    )
    grad_accum: int = setting(1, "Micro-batches per optimizer step.", at_least=1)
    # nanochat's total batch: the optimisation sees a fixed batch while --batch-size is tuned to the GPU's memory
    batch_tokens: int | None = setting(
        None,
        "Tokens per optimizer step over all ranks; sets --grad-accum to N / (batch-size x seq_len x ranks), "
        "rounded up.",
        at_least=1,
    )
    lr: float = setting(3e-4, "Peak learning rate (AdamW; linear warmup, cosine decay to 0.1x).", above=0)
    min_lr_ratio: float = 0.1
    warmup: float = setting(0.05, "Warmup as a fraction of the steps.")
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only).")
    clip: float = setting(1.0, "Gradient-norm clipping.")
    seed: int = setting(0, "Seed of the student's init and of the data order.")
    resume: bool = setting(False, "Continue the checkpoint in --out exactly.")
    save_every: int = setting(200, "Checkpoint every N steps (and at the end).", at_least=1)
    log_every: int = setting(10, "Append a line to RUN/metrics.jsonl (and to --report-to) every N steps.", at_least=1)
    shuffle_buffer: int = setting(1024, "Rows held for shuffling the stream.", at_least=1)
    num_workers: int | None = setting(
        None,
        "DataLoader worker processes reading shards. Default: 2 on CUDA (reading and collating overlap the step), "
        "0 on the CPU (workers would take the step's cores).",
        at_least=0,
    )
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = setting(
        "auto", "Autocast: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16."
    )
    compile: bool | None = setting(
        None,
        "torch.compile the student. Default: on CUDA (an H200 trained `base` at 124k tokens/s compiled against 92k "
        "eager), off on the CPU.",
        flag="--compile/--no-compile",
    )
    fsdp: bool = setting(False, "FSDP2 instead of DDP under torchrun.")
    progress: bool = setting(True, "Show a progress bar.")
    # none | tensorboard | wandb (train/tracking.py); RUN/metrics.jsonl is always written
    report_to: ReportTo = setting(
        "none",
        "Also log to: none | tensorboard (RUN/tb) | wandb (offline without a W&B key); pip install 'ar2mdm[track]'.",
    )

    def check(self) -> None:
        check_settings(self)  # every Literal field and every range (setting(at_least=...))
        if self.batch_tokens is not None and self.grad_accum != 1:
            raise UserError("--batch-tokens sets --grad-accum: give one of them, not both")
        if self.batch_size == "auto" and self.grad_accum != 1:
            raise UserError("--batch-size auto sets --grad-accum: give the step's size as --batch-tokens instead")
        shares = [share for _, share in self.mixture]
        if sum(shares) >= 1:
            raise UserError(f"--mix shares sum to {sum(shares):g}: they must leave SHARDS a share (sum below 1)")

    @property
    def mixture(self) -> list[tuple[str, float]]:
        """The --mix folders and their shares, checked: FOLDER:SHARE with 0 < SHARE < 1."""
        out = []
        for m in self.mix:
            folder, _, share = m.rpartition(":")
            try:
                value = float(share)
            except ValueError:
                value = -1.0
            if not folder or not 0 < value < 1:
                raise UserError(f"--mix {m!r}: give FOLDER:SHARE with a share between 0 and 1, e.g. rounds/r1:0.25")
            out.append((folder, value))
        return out

    @property
    def run_dir(self) -> Path:
        """--out, default runs/<shards folder name>."""
        return Path(self.out or Path("runs") / Path(self.shards).resolve().name)

    def check_paths(self) -> None:
        """Raise UserError on a missing shard folder or a run folder that cannot be written (cheap: no torch)."""
        for folder in [self.shards] + [f for f, _ in self.mixture]:
            if not Path(folder).is_dir():
                raise UserError(f"shard folder {folder} does not exist")
        check_output_folder(self.run_dir, "--out")

    def tail_for(self, exact_support: bool) -> str:
        """The tail the KD term uses: --tail, where auto is renormalize for shards whose stored entries are the
        whole target (``TargetSpec.exact_support``) and bucket for the rest."""
        if self.tail != "auto":
            return self.tail
        return "renormalize" if exact_support else "bucket"

    @property
    def shift(self) -> bool:
        """The AR shift the student gets: --ar-shift/--no-ar-shift, else on exactly when adapting an AR model."""
        return self.init_from is not None if self.ar_shift is None else self.ar_shift

    @property
    def schedule(self) -> str:
        """The λ schedule the run uses: --lambda-schedule, where auto is linear-warmup when adapting an AR model."""
        if self.lambda_schedule != "auto":
            return self.lambda_schedule
        return "linear-warmup" if self.init_from is not None else "constant"

    def objective(self, spec) -> "Objective":
        """The objective these settings train on shards of ``spec`` (a `data.TargetSpec`): auto settings resolved."""
        from ar2mdm.train.objective import Objective

        return Objective(
            lam=self.lam,
            schedule=self.schedule,
            lambda_t=self.lambda_t,
            temperature=self.temperature,
            tail=self.tail_for(spec.exact_support),
            weighting=self.loss_weighting,
        )

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class EvalConfig:
    """Every setting of `kdtrain eval` (and of the sweep's evaluation)."""

    run: str = setting(dataclasses.MISSING, "A kdtrain run folder.", argument=True)
    data: str | None = setting(
        None, "A corpus (file/folder, save_to_disk dataset, hf:NAME) or a kdtargets shard folder (required)."
    )
    seed: int = setting(0, "Seed of the evaluation masks (the same seed gives every run the same masks).")
    mask_draws: int = setting(4, "Mask draws per row (stratified numbers of masked tokens).", at_least=1)
    max_rows: int = setting(256, "Rows evaluated (the first ones).", at_least=1)
    batch_size: int = setting(16, "Rows per forward.", at_least=1)
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    by_line: bool = setting(False, "Raw text: one document per non-empty line.")
    text_field: str = setting("text", "Raw .jsonl/.parquet/dataset: the field that holds the text.")
    split: str = setting("test", "A dataset --data: the split evaluated.")
    task: Literal["auto", "pretrain", "sft"] = setting(
        "auto",
        "auto (the run's own) | pretrain | sft: --data holds chats (messages, or prompt + response), scored on the "
        "responses only.",
    )
    messages_field: str = setting("messages", "--task sft: the field of the rows holding a chat.")
    by_level: int | None = setting(
        None,
        "Also report masked-token figures in N bins of the masking level: the bound's nll and accuracy by the share "
        "of a row (block) masked, and on shards the KD term against the stored targets by the row's (block's) t.",
        at_least=1,
    )
    row_estimates: bool = False  # API only: also return each row's estimate and tokens (paired comparisons)

    def check(self) -> None:
        check_settings(self)
        if not self.data:
            raise UserError("--data is required: the held-out corpus or shard folder to evaluate on")


@dataclass
class LmEvalConfig:
    """Every setting of `kdtrain lm-eval`: a student beside its teacher on the LM Evaluation Harness's tasks."""

    run: str = setting(dataclasses.MISSING, "A kdtrain run folder or an exported student folder.", argument=True)
    tasks: str = setting(
        "heldout",
        "Comma-separated lm-eval tasks or tags: heldout (three tasks made from held-out text, offline: "
        "heldout_choice, heldout_cloze, heldout_continue) or the harness's own (hellaswag, arc_easy, piqa, "
        "lambada_openai, ...: their data come from the hub or its cache).",
    )
    teacher: str = setting(
        "default",
        "The AR model beside the student, through the harness's hf model: default (the embedded teacher), code, "
        "gemma, an HF folder or a .gguf file; none: the student alone.",
    )
    heldout: str | None = setting(
        None, "heldout: the corpus its tasks are made from (default: the default corpus's comedies)."
    )
    docs: int = setting(200, "heldout: examples per task.", at_least=1)
    limit: int | None = setting(None, "At most this many examples per task (the harness's --limit).", at_least=1)
    num_fewshot: int | None = setting(None, "Few-shot examples per prompt (default: each task's own).", at_least=0)
    model_args: str = setting(
        "",
        "More model_args for the student, KEY=VALUE,... (likelihood=elbo,mc_num=64; threshold; per_forward; steps; "
        "remasking; span_length; max_length; max_gen_toks; temperature).",
    )
    seed: int = setting(0, "Seed of the harness's sampling and of the student's draws.")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")
    out: str | None = setting(None, "Write the table and both models' results as JSON to this file.")

    def check(self) -> None:
        check_settings(self)
        if self.out:
            check_output_file(Path(self.out), "--out")
        if not Path(self.run).exists():
            raise UserError(f"{self.run} does not exist: give a kdtrain run folder or an exported student folder")


# the sampler settings of one student kind, which the other kind's sampler does not read
FULL_SAMPLER = ("steps", "remasking", "span_length")
BLOCK_SAMPLER = ("threshold", "per_forward")


@dataclass
class SampleConfig(SampleSettings):
    """Every setting of `kdtrain sample`."""

    run: str = setting(dataclasses.MISSING, "A kdtrain run folder.", argument=True)
    steps: int = setting(
        32, "Full-attention students: denoising steps (at most --length); fewer reveal more tokens each.", at_least=1
    )
    # default: the student's own distribution (random order, T = 1), which the ELBO bound scores and the judged
    # figures of docs/results.md use; low-confidence at T = 0 is LLaDA's decoding for answers, which a judge
    # scores better at the price of repetition (docs/results.md, sample quality)
    temperature: float = setting(1.0, "1: the student's own distribution; 0: greedy; else tempered.", at_least=0)
    remasking: Literal["random", "low-confidence"] = setting(
        "random",
        "Full-attention students: random (reveal positions in random order: MDLM's ancestral sampler) | "
        "low-confidence (reveal the most confident predictions first: LLaDA).",
    )
    span_length: int | None = setting(
        None,
        "Full-attention students: reveal the completion span by span, left to right (LLaDA's semi-autoregressive "
        "decoding, its block length; --steps shared among the spans). Default: the whole length at once.",
        at_least=1,
    )
    threshold: float = setting(
        0.9,
        "Block students: each forward reveals every masked position of the current block whose top probability "
        "exceeds this, and at least the most confident one (1: one per forward).",
        at_least=0,
        at_most=1,
    )
    per_forward: int | None = setting(
        None, "Block students: reveal this many of the most confident positions per forward instead.", at_least=1
    )
    states: str | None = setting(
        None,
        "Also write states the trajectories visited to this JSONL file (on-policy rows for kdtargets build --states).",
    )
    states_per_sample: int = setting(
        1, "--states: states kept per trajectory, at steps drawn uniformly (so spread over noise levels).", at_least=1
    )
    raw: bool = setting(False, "Print prompt + completion as plain text (default: labelled, newlines shown as \\n).")
    chat: bool | None = setting(
        None,
        "The prompt is a user turn, rendered as the SFT build rendered its chats, and the answer stops at its first "
        "end of turn. Default: on for SFT runs.",
        flag="--chat/--no-chat",
    )
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")

    def check(self) -> None:
        check_settings(self)
        check_sample_settings(self)
        if self.states:
            check_output_file(Path(self.states), "--states")

    def check_kind(self, block_student: bool) -> None:
        """Refuse, in one line, a sampler setting of the other student kind set away from its default (it would
        change nothing)."""
        other, kind = (FULL_SAMPLER, "full-attention") if block_student else (BLOCK_SAMPLER, "block")
        fields = {f.name: f for f in dataclasses.fields(self)}
        given = [n for n in other if getattr(self, n) != fields[n].default]
        if given:
            flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
            this = "a block" if block_student else "a full-attention"
            raise UserError(f"{flags}: a setting of {kind} students' sampler; {self.run} is {this} student")


@dataclass
class FillConfig:
    """Every setting of `kdtrain fill`."""

    run: str = setting(dataclasses.MISSING, "A kdtrain run folder.", argument=True)
    text: str | None = setting(None, "Text with [MASK] where the student predicts one token each (required).")
    top: int = setting(5, "Predictions shown per mask.", at_least=1)
    chat: bool = setting(
        False, "--text is the answer to the user turn --prompt, rendered as the SFT build renders a chat."
    )
    prompt: str = setting("", "--chat: the user's turn that --text answers.")
    device: str = setting("auto", "auto | cpu | cuda | cuda:N")

    def check(self) -> None:
        check_settings(self)
        if self.text is None:
            raise UserError("--text is required: a sentence with [MASK] where the student predicts")
        if self.prompt and not self.chat:
            raise UserError("--prompt goes with --chat (the user turn that --text answers)")
