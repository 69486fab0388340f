"""`TrainConfig`: every setting of `kdtrain run`, typed, with its checks. The CLI only fills it in."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from ar2mdm.shared.errors import UserError
from ar2mdm.shared.paths import check_output_folder

LAMBDA_SCHEDULES = ("constant", "linear-decay", "cosine-decay", "linear-warmup")  # losses.kd_weight
LAMBDA_T = ("none", "low-t", "high-t")
REPORT_TO = ("none", "tensorboard", "wandb")  # train/tracking.py


@dataclass
class TrainConfig:
    shards: str
    out: str | None = None  # default: runs/<shards folder name>
    student: str = "small"  # preset (tiny, small, base) or a JSON file
    init_from: str | None = None  # AR checkpoint (HF folder or .gguf) with the shards' tokenizer
    ar_shift: bool | None = None  # predict x_i from h_{i-1} (Dream); None: on with --init-from, off otherwise
    lam: float = 0.5  # λ: weight of the KD term
    # λ over training progress (losses.kd_weight); auto: linear-warmup with --init-from, constant from scratch
    # (docs/results.md: a warm student first adapts to the mask through the MDM term, and KD from step 0 slows
    # that; from scratch, KD from step 0 is what helps)
    lambda_schedule: str = "auto"
    lambda_t: str = "none"  # λ over each row's mask ratio t
    temperature: float = 1.0
    # auto: bucket when the shards keep a truncated support (mc, fim, topk with top_n < K+1), else renormalize
    # (docs/results.md: on mc targets bucket beat renormalize by 0.12 nats/token held out, and made T = 2 usable)
    tail: Literal["auto", "renormalize", "bucket"] = "auto"
    loss_weighting: Literal["seed", "elbo"] = "seed"  # elbo: multiply the MDM term by 1/t
    resample_masks: bool = False
    allow_partial: bool = False  # train on a build whose world is not finished (some ranks missing)
    steps: int | None = None  # default: epochs x (rows per rank / batch)
    stop_at: int | None = None  # stop (with a checkpoint) after this step; the schedule still spans `steps`
    epochs: int = 1
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: float = 0.05  # fraction of the steps
    weight_decay: float = 0.1
    clip: float = 1.0
    seed: int = 0
    resume: bool = False
    save_every: int = 200
    log_every: int = 10
    shuffle_buffer: int = 1024
    num_workers: int = 0
    device: str = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # autocast; auto: bf16 on CUDA, fp32 on CPU
    compile: bool = False
    fsdp: bool = False
    progress: bool = True
    report_to: str = "none"  # none | tensorboard | wandb (train/tracking.py); RUN/metrics.jsonl is always written

    def check(self) -> None:
        if not 0.0 <= self.lam <= 1.0:
            raise UserError(f"--lambda must be in [0, 1], got {self.lam}")
        if self.lambda_schedule not in ("auto", *LAMBDA_SCHEDULES):
            raise UserError(
                f"--lambda-schedule must be one of auto, {', '.join(LAMBDA_SCHEDULES)}, got {self.lambda_schedule!r}"
            )
        if self.lambda_t not in LAMBDA_T:
            raise UserError(f"--lambda-t must be one of {', '.join(LAMBDA_T)}, got {self.lambda_t!r}")
        if self.temperature <= 0:
            raise UserError(f"--temperature must be > 0, got {self.temperature}")
        if self.tail not in ("auto", "renormalize", "bucket"):
            raise UserError(f"--tail must be auto, renormalize or bucket, got {self.tail!r}")
        if self.loss_weighting not in ("seed", "elbo"):
            raise UserError(f"--loss-weighting must be seed or elbo, got {self.loss_weighting!r}")
        for name in ("batch_size", "grad_accum", "epochs", "save_every", "log_every", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 0:
            raise UserError(f"--steps must be at least 0 (0 saves the initial student), got {self.steps}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise UserError(f"--dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.report_to not in REPORT_TO:
            raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {self.report_to!r}")
        if self.lr <= 0:
            raise UserError(f"--lr must be > 0, got {self.lr}")

    @property
    def run_dir(self) -> Path:
        """--out, default runs/<shards folder name>."""
        return Path(self.out or Path("runs") / Path(self.shards).resolve().name)

    def check_paths(self) -> None:
        """Raise UserError on a missing shard folder or a run folder that cannot be written (cheap: no torch)."""
        if not Path(self.shards).is_dir():
            raise UserError(f"shard folder {self.shards} does not exist")
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

    def to_dict(self) -> dict:
        return asdict(self)
