"""`kdtrain run`, top to bottom: shards + manifest -> student -> AdamW loop -> checkpoints and metrics.

Distributed training goes through torchrun: with WORLD_SIZE > 1 the process group is initialised (NCCL on
CUDA, gloo on CPU) and the student wrapped in DDP (or FSDP2 with --fsdp); each rank streams its own rows.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ar2mdm.schemas import Manifest, SchemaError
from ar2mdm.schemas.manifest import TOKENIZER_DIR
from ar2mdm.shared.blocks import check_block_fit
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.student.model import Student
from ar2mdm.train.checkpoint import CKPT, checkpoint_dir, load_meta, load_student, save_checkpoint
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.data import Batch, BatchLoader, RowStream, Source, TargetSpec, load_shard_manifest
from ar2mdm.train.device import autocast_for, read_parts, resolve_device
from ar2mdm.train.objective import Objective, step_losses
from ar2mdm.train.presets import student_config
from ar2mdm.train.tracking import open_tracker


def _kept(saved: int | None, run: Path) -> str:
    return f"the checkpoint of step {saved} in {run} is kept" if saved is not None else "no checkpoint was written yet"


def _nonfinite(what: str, step: int, saved: int | None, run: Path) -> str:
    return (
        f"step {step}: non-finite {what}; stopped before the update ({_kept(saved, run)}); "
        "lower --lr or --temperature, or check the shards with `kdtargets validate`"
    )


def _damaged(e: SchemaError, step: int, saved: int | None, run: Path) -> str:
    """One line for a shard found damaged mid-run (from a DataLoader worker the error's own line is the last)."""
    line = [ln for ln in str(e).splitlines() if ln.strip()][-1].split("SchemaError: ")[-1]
    then = "rerun with --resume" if saved is not None else "rerun"
    return f"step {step}: {line}; stopped ({_kept(saved, run)}; after the repair, {then})"


def full_states(model, opt, fsdp: bool) -> tuple[dict, dict]:
    """Unsharded model and optimizer state dicts (gathered to rank 0 on the CPU under FSDP2)."""
    if not fsdp:
        return model.state_dict(), opt.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    return get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def lr_at(step: int, total: int, cfg: TrainConfig) -> float:
    """Linear warmup then cosine decay to min_lr_ratio * lr."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    frac = (step - warm) / max(1, total - warm)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _dist() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, world > 1


def build_student(cfg: TrainConfig, manifest: Manifest) -> Student:
    """The student the shards call for: a block student of their block size, or a full-attention one."""
    tok = manifest.tokenizer
    if cfg.init_from:
        from ar2mdm.train.init import student_from_ar

        return student_from_ar(
            cfg.init_from,
            tok.vocab_size,
            tok.sha256,
            manifest.seq_len,
            shift=cfg.shift,
            block_size=manifest.block_size,
        )
    return Student(
        student_config(cfg.student, tok.vocab_size, manifest.seq_len, shift=cfg.shift, block_size=manifest.block_size)
    )


@dataclass
class Trainer:
    """What the training loop needs, set up by `setup_training`; ``step``, ``saved`` and ``rows_done`` advance."""

    cfg: TrainConfig
    run: Path
    rank: int
    world: int
    distributed: bool
    device: str
    model: Student  # the student itself: checkpoints, clipping, the optimizer's parameters
    train_model: torch.nn.Module  # what the forward calls: the student, or its DDP/FSDP/compiled wrapper
    opt: torch.optim.Optimizer
    batches: Iterator[Batch]  # this rank's batches, resumed after the rows already consumed
    spec: TargetSpec
    objective: Objective  # the loss the settings call for on these shards
    meta: dict  # written into every checkpoint (how the student was trained)
    tok_dir: Path
    total: int  # the schedule's length in steps (learning rate, λ schedule)
    end: int  # where this invocation stops (--stop-at), <= total
    rows_per_rank: int
    step: int = 0
    saved: int | None = None  # the step of the last checkpoint on disk
    rows_done: int = 0  # rows this rank consumed from the current mixture (resume skips them)
    mix: list = field(default_factory=list)  # the --mix folders and shares: a resume with another starts afresh

    def save(self) -> None:
        """A checkpoint of the current step (a collective under FSDP: every rank takes part)."""
        model_sd, opt_sd = full_states(self.model, self.opt, self.cfg.fsdp and self.distributed)
        if self.rank == 0:
            st = {"step": self.step, "rows": self.rows_done, "optimizer": opt_sd, "torch_rng": torch.get_rng_state()}
            st["mix"] = self.mix
            save_checkpoint(self.run, model_sd, self.model.config, meta=self.meta, state=st, tokenizer_dir=self.tok_dir)
        self.saved = self.step


def run_training(cfg: TrainConfig) -> dict:
    """Train (or resume) a student; returns the final metrics. Raises UserError on bad input."""
    return train(setup_training(cfg))


def train(tr: Trainer) -> dict:
    """The loop: one optimizer step per iteration, a metrics line every --log-every steps, a checkpoint every
    --save-every steps and at the end."""
    cfg = tr.cfg
    metrics_f = open(tr.run / "metrics.jsonl", "a") if tr.rank == 0 else None
    tracker = open_tracker(cfg.report_to, tr.run, cfg.to_dict()) if tr.rank == 0 else None  # metrics.jsonl always
    if tracker:
        print(f"kdtrain: metrics also to {tracker.where}", file=sys.stderr)
    from tqdm import tqdm

    bar = tqdm(
        total=tr.total,
        initial=tr.step,
        unit="step",
        desc="kdtrain",
        disable=not cfg.progress or tr.rank != 0,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    autocast = autocast_for(tr.device, cfg.dtype)
    t_last, tokens, last = time.time(), 0, {}
    while tr.step < tr.end:
        parts, gnorm, n = train_step(tr, autocast)
        tokens += n
        now = time.time()
        last = {
            "step": tr.step,
            **parts,
            "lr": tr.opt.param_groups[0]["lr"],
            "grad_norm": gnorm,
            "tokens_per_s": tokens * tr.world / max(now - t_last, 1e-9),
            "epoch": tr.rows_done / max(tr.rows_per_rank, 1),
        }
        bar.update(1)
        bar.set_postfix(loss=f"{parts['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if metrics_f and (tr.step % cfg.log_every == 0 or tr.step == tr.end):
            metrics_f.write(json.dumps(last) + "\n")
            metrics_f.flush()
            if tracker:
                tracker.log(last, tr.step)
        if tr.step % cfg.log_every == 0:
            t_last, tokens = now, 0
        if tr.step % cfg.save_every == 0 or tr.step == tr.end:
            tr.save()
    if tr.total == 0 and not cfg.resume:  # --steps 0: the initial student (e.g. the warm start) as a checkpoint
        tr.save()
    bar.close()
    if metrics_f:
        metrics_f.close()
    if tracker:
        tracker.close()
    if tr.distributed:
        torch.distributed.barrier()
    return {"run": str(tr.run), "steps": tr.step, **last}


def train_step(tr: Trainer, autocast) -> tuple[dict[str, float], float, int]:
    """One optimizer step over --grad-accum micro-batches: (the loss terms, averaged; the gradient norm before
    clipping; the tokens seen). Stops in one line on a non-finite loss or gradient, or a damaged shard.

    The loss terms and the gradient norm are read back together, once per step, just before the update: every
    other read of a device value would stall the host until the device caught up, and leave the device idle
    while the host queued the next kernels."""
    cfg = tr.cfg
    for group in tr.opt.param_groups:
        group["lr"] = lr_at(tr.step, tr.total, cfg)
    tr.opt.zero_grad(set_to_none=True)
    acc: dict[str, torch.Tensor] = {}
    tokens = 0
    for _ in range(cfg.grad_accum):
        try:
            batch = next(tr.batches).to(tr.device, non_blocking=True)
        except SchemaError as e:  # a shard damaged after the start-up checks: one line, the checkpoint kept
            raise UserError(_damaged(e, tr.step + 1, tr.saved, tr.run)) from None
        tr.rows_done += batch.input_ids.shape[0]
        tokens += batch.input_ids.numel()
        with autocast:
            progress = tr.step / max(tr.total, 1)
            loss, parts = step_losses(
                tr.train_model, batch, tr.objective, tr.spec, mask_id=tr.model.config.mask_id, progress=progress
            )
        (loss / cfg.grad_accum).backward()
        for k, v in parts.items():
            acc[k] = acc[k] + v / cfg.grad_accum if k in acc else v / cfg.grad_accum
    gnorm = torch.nn.utils.clip_grad_norm_(tr.model.parameters(), cfg.clip)
    parts, (gnorm,) = read_parts(acc, gnorm)  # the step's one host sync
    if not math.isfinite(parts["loss"]):  # NaN gradients follow; clipping would spread them into every weight
        raise UserError(_nonfinite(f"loss {parts['loss']}", tr.step + 1, tr.saved, tr.run))
    if not math.isfinite(gnorm):
        raise UserError(_nonfinite(f"gradient norm {gnorm}", tr.step + 1, tr.saved, tr.run))
    tr.opt.step()
    tr.step += 1
    return parts, gnorm, tokens


def setup_training(cfg: TrainConfig) -> Trainer:
    """Check the shards against the settings, build or resume the student, wrap it (DDP/FSDP/compile), and
    open the data stream where the last checkpoint left it; say what the run will do."""
    cfg.check()
    shards = Path(cfg.shards)
    sources = _sources(cfg)
    manifest = sources[0].manifest
    spec = replace(TargetSpec.from_manifest(manifest), states=any(s.manifest.states is not None for s in sources))
    _check_shards(cfg, sources, spec)
    run = cfg.run_dir
    rank, world, distributed = _dist()
    device = _device(cfg, distributed)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    model, state = _student(cfg, manifest, run)
    model.to(device)
    resumed = state is not None
    cfg = _micro_batches(
        cfg, model, spec, seq_len=manifest.seq_len, world=world, device=device, resumed=resumed, rank=rank
    )
    # data: a fixed number of steps per epoch, the same on every rank, so DDP ranks never wait on each other
    rows_per_rank = min(RowStream(shards, manifest, r, world, cfg.seed).rows_per_epoch(manifest) for r in range(world))
    steps_per_epoch = max(1, rows_per_rank // (cfg.batch_size * cfg.grad_accum))
    total = cfg.epochs * steps_per_epoch if cfg.steps is None else cfg.steps
    if rank == 0:
        _announce(cfg, rows_per_rank, world, steps_per_epoch, total)
    train_model, opt = _wrap(cfg, model, device, distributed, state)
    mix = [[str(s.directory.resolve()), s.share] for s in sources[1:]]
    rows_done = state["rows"] if state and state.get("mix", []) == mix else 0
    if state and rows_done == 0 and rank == 0:
        print("kdtrain: a new data mixture: its stream starts afresh; the step and optimizer continue", file=sys.stderr)
    loader = _loader(cfg, sources, rank=rank, world=world, device=device, rows_done=rows_done)
    run.mkdir(parents=True, exist_ok=True)
    step = state["step"] if state else 0
    return Trainer(
        cfg=cfg,
        run=run,
        rank=rank,
        world=world,
        distributed=distributed,
        device=device,
        model=model,
        train_model=train_model,
        opt=opt,
        batches=iter(loader),
        spec=spec,
        objective=cfg.objective(spec),
        meta=_run_meta(cfg, manifest),
        tok_dir=shards / TOKENIZER_DIR,
        total=total,
        end=min(total, cfg.stop_at) if cfg.stop_at else total,
        rows_per_rank=rows_per_rank,
        step=step,
        saved=step if state else None,
        rows_done=rows_done,
        mix=mix,
    )


def _sources(cfg: TrainConfig) -> list[Source]:
    """SHARDS and the --mix folders, each with its share of a batch's rows; refused in one line where they do not
    fit together (another tokenizer, row length, task or kind of targets)."""
    main = load_shard_manifest(cfg.shards, cfg.allow_partial)
    mixture = cfg.mixture
    sources = [Source(Path(cfg.shards), main, 1.0 - sum(share for _, share in mixture))]
    for folder, share in mixture:
        m = load_shard_manifest(folder, cfg.allow_partial)
        for what, mine, theirs in (
            ("tokenizer", m.tokenizer.sha256, main.tokenizer.sha256),
            ("row length", m.seq_len, main.seq_len),
            ("block size", m.block_size, main.block_size),
            ("task", m.task, main.task),
            ("kind of targets", _kind(m), _kind(main)),
        ):
            if mine != theirs:
                raise UserError(f"--mix {folder}: another {what} than {cfg.shards} ({mine} against {theirs})")
        sources.append(Source(Path(folder), m, share))
    return sources


def _kind(m: Manifest) -> tuple:
    """What a batch's targets must share across folders: entries kept, whether they are the whole target (the
    tail), and whether they were sampled."""
    spec = TargetSpec.from_manifest(m)
    return spec.top_n, spec.exact_support, spec.sampled


def _check_shards(cfg: TrainConfig, sources: list[Source], spec: TargetSpec) -> None:
    """Refuse settings these shards cannot serve, in one line."""
    for s in sources:
        m = s.manifest
        if cfg.resample_masks and (m.mask_dependent_targets or not m.targets_at_all_positions):
            raise UserError(
                "--resample-masks needs targets at every position that do not depend on the mask "
                f"(build with --positions all and --mode topk or fim); {s.directory} is mode {m.mode}, "
                f"positions {m.params.get('positions')}"
            )
    if spec.sampled and cfg.temperature != 1.0 and cfg.lam > 0:
        raise UserError(
            f"--temperature {cfg.temperature}: these shards hold sampled targets (--sparsify sample), an "
            "unbiased estimate of q at T = 1 only; train them at --temperature 1, or build top-N targets"
        )
    if spec.states and cfg.lam == 0:
        raise UserError(
            "--lambda 0 with a student's states: their rows have no truth, only teacher targets; give λ > 0"
        )


def _device(cfg: TrainConfig, distributed: bool) -> str:
    """The device of this process: under torchrun on CUDA, the GPU of its local rank."""
    device = resolve_device(cfg.device)
    if device == "cuda" and distributed:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    return device


def _run_meta(cfg: TrainConfig, manifest: Manifest) -> dict:
    """How the student was trained, written into every checkpoint."""
    return {
        "mask_id": manifest.tokenizer.vocab_size,
        "tokenizer_sha256": manifest.tokenizer.sha256,
        "shards": str(Path(cfg.shards).resolve()),
        "train": cfg.to_dict(),  # --batch-size auto as it was resolved: a resume takes the same micro-batches
        "seq_len": manifest.seq_len,
        "task": manifest.task,
        "sft_format": manifest.sft_format,
    }


def _loader(cfg: TrainConfig, sources: list[Source], *, rank: int, world: int, device: str, rows_done: int):
    """This rank's batches, from where the checkpoint left them (``rows_done`` rows of this mixture consumed)."""
    stream = BatchLoader(
        sources,
        rank,
        world,
        cfg.seed if len(sources) == 1 else f"{cfg.seed}:mix:{len(sources)}",  # each mixture its own order
        batch_size=cfg.batch_size,
        skip_batches=rows_done // cfg.batch_size,
        shuffle_buffer=cfg.shuffle_buffer,
        resample_masks=cfg.resample_masks,
        mask_eps=float(sources[0].manifest.params.get("mask_eps", 1e-3)),
    )
    return torch.utils.data.DataLoader(
        stream,
        batch_size=None,
        num_workers=cfg.num_workers if cfg.num_workers is not None else (2 if device.startswith("cuda") else 0),
        pin_memory=device.startswith("cuda"),  # page-locked batches: the copy below does not block the step
    )


def _micro_batches(
    cfg: TrainConfig,
    model: Student,
    spec: TargetSpec,
    *,
    seq_len: int,
    world: int,
    device: str,
    resumed: bool,
    rank: int,
) -> TrainConfig:
    """``cfg`` with --batch-size and --grad-accum as the run takes them: --batch-size auto resolved (or, on
    --resume, taken from the checkpoint, so that the data stream continues where it stopped), and --batch-tokens
    turned into micro-batches."""
    if cfg.batch_size == "auto" and resumed:
        old = load_meta(cfg.run_dir)["train"]
        return replace(cfg, batch_size=old["batch_size"], grad_accum=old["grad_accum"])
    if cfg.batch_size == "auto":
        from ar2mdm.train.memory import auto_batch

        cfg, said = auto_batch(
            cfg,
            model,
            spec,
            seq_len=seq_len,
            world=world,
            device=device,
            autocast=autocast_for(device, cfg.dtype),
            fsdp=cfg.fsdp,
        )
        if rank == 0:
            print(f"kdtrain: {said}", file=sys.stderr)
        return cfg
    if cfg.batch_tokens is not None:  # the micro-batches a step takes, from the total batch in tokens
        return replace(cfg, grad_accum=-(-cfg.batch_tokens // (cfg.batch_size * seq_len * world)))
    return cfg


def _student(cfg: TrainConfig, manifest: Manifest, run: Path) -> tuple[Student, dict | None]:
    """The student to train and, with --resume, the training state of its checkpoint."""
    if not cfg.resume:
        if (run / CKPT).exists():
            raise UserError(f"{run} already holds a checkpoint; pass --resume to continue it or choose another --out")
        return build_student(cfg, manifest), None
    old = load_meta(run)
    if old["tokenizer_sha256"] != manifest.tokenizer.sha256:
        raise UserError(f"--resume: {run} was trained with another tokenizer than the shards in {cfg.shards}")
    check_block_fit(old["student"].get("block_size"), manifest.block_size, f"--resume: the student in {run}")
    tok = manifest.tokenizer
    want = student_config(
        cfg.student, tok.vocab_size, manifest.seq_len, shift=cfg.shift, block_size=manifest.block_size
    )
    if cfg.init_from is None and {"block_size": None, **old["student"]} != want.to_dict():
        raise UserError(f"--resume: the checkpoint in {run} has another student config than --student {cfg.student}")
    model, _ = load_student(run)
    model.train()
    return model, torch.load(checkpoint_dir(run) / "state.pt", weights_only=False)


def _announce(cfg: TrainConfig, rows_per_rank: int, world: int, steps_per_epoch: int, total: int) -> None:
    """Say what the run will do before it starts, in numbers that add up."""
    per_step = cfg.batch_size * cfg.grad_accum
    why = f" (--epochs {cfg.epochs} x {steps_per_epoch} whole steps per epoch)" if cfg.steps is None else ""
    if cfg.batch_tokens is not None:
        print(
            f"kdtrain: --batch-tokens {cfg.batch_tokens}: --grad-accum {cfg.grad_accum} micro-batches of "
            f"{cfg.batch_size} rows per rank and step",
            file=sys.stderr,
        )
    print(
        f"kdtrain: {rows_per_rank} rows per rank x {world} rank(s); {total} steps{why} x {per_step} rows per step "
        f"and rank = {total * per_step} rows per rank = {total * per_step / max(rows_per_rank, 1):.2f} epochs; "
        f"λ = {cfg.lam} ({cfg.schedule})",
        file=sys.stderr,
        flush=True,
    )
    if rows_per_rank < per_step:
        warn(
            f"fewer rows per rank ({rows_per_rank}) than one step takes ({per_step}): every step repeats rows; "
            "lower --batch-size or build more rows"
        )


def _wrap(cfg: TrainConfig, model: Student, device: str, distributed: bool, state: dict | None):
    """(the module the forward calls: DDP, FSDP2 or the student, compiled with --compile (default on CUDA); AdamW,
    resumed)."""
    fsdp = cfg.fsdp and distributed
    train_model = model
    if distributed:
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            ids = [device] if device.startswith("cuda") else None
            train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if cfg.compile if cfg.compile is not None else device.startswith("cuda"):
        train_model = torch.compile(train_model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for the whole update on CUDA (PyTorch's fastest AdamW); the CPU keeps the plain loop
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95), fused=device.startswith("cuda") and not fsdp)
    if state:
        if fsdp:  # the checkpoint holds the full optimizer state; each rank keeps its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
    return train_model, opt
