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
from pathlib import Path

import numpy as np
import torch

from ar2mdm.schemas import Manifest, SchemaError
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.train.checkpoint import checkpoint_dir, load_meta, load_student, save_checkpoint
from ar2mdm.train.config import TrainConfig
from ar2mdm.shared.masking import maskable_positions
from ar2mdm.shared.shards import check_shard_file
from ar2mdm.shared.validate import partial_world_line
from ar2mdm.train.data import Batch, BatchLoader, RowStream, TargetSpec
from ar2mdm.train.losses import (combined_loss, corrupt, elbo_weight, kd_loss, kd_weight, mdm_loss, row_norm,
                                 storage_slack, student_logprobs)
from ar2mdm.train.model import Student, StudentConfig
from ar2mdm.train.tracking import open_tracker


def load_shard_manifest(shards: str | Path, allow_partial: bool = False) -> Manifest:
    """The shard folder's manifest, after cheap checks of its files. A build whose world is not finished (some
    ranks never ran or stopped) is refused unless ``allow_partial``: a student trained on a third of the data
    without a word is worse than a one-line stop."""
    d = Path(shards)
    if not d.is_dir():
        raise UserError(f"shard folder {d} does not exist")
    try:
        m = Manifest.load(d)
    except SchemaError as e:
        raise UserError(str(e)) from e
    partial = partial_world_line(d, m)
    if partial and not allow_partial:
        raise UserError(f"{partial}; or pass --allow-partial to train on what is there")
    if partial:
        warn(f"{partial}; using those rows (--allow-partial): the rows the missing ranks would add are known only "
             "once they finish")  # fmt: skip
    if not m.shards:
        raise UserError(f"shard folder {d} lists no shards (build not run or not finished)")
    if not (d / "tokenizer").is_dir():
        raise UserError(f"shard folder {d} has no tokenizer/ (kdtargets build writes it; the student needs it)")
    for s in m.shards:  # cheap checks of every file before anything starts (`kdtargets validate` does them all)
        check_shard_file(d / s.file, s.bytes)
    return m


def step_losses(model, batch: Batch, cfg: TrainConfig, mask_id: int, spec: TargetSpec,
                progress: float = 0.0) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Loss of one batch: (1-λ)·MDM + λ·KD, and its parts as floats. ``progress``: step / total steps, for a
    λ schedule; with a schedule or a t-dependent λ, each row gets its own λ_b (`losses.kd_weight`)."""
    x_t = corrupt(batch.input_ids, batch.mask, mask_id)  # (B, L)
    logits = model(x_t, batch.mask)  # (K, V) at the masked positions
    row = batch.mask.nonzero()[:, 0]  # (K,)
    L = batch.input_ids.shape[1]
    norm = row_norm(batch.prompt_len, L)  # seed §1: 1/L pretrain, 1/|response| SFT
    if cfg.loss_weighting == "elbo":
        weight = elbo_weight(batch.t, batch.mask, maskable_positions(L, batch.prompt_len))  # (B,)
    else:
        weight = torch.ones_like(batch.t)
    per_row = cfg.lam > 0.0 and (cfg.schedule != "constant" or cfg.lambda_t != "none")  # λ = 0 stays 0: no KD term
    lam = kd_weight(cfg.lam, progress, batch.t, cfg.schedule, cfg.lambda_t) if per_row else cfg.lam  # (B,) or float
    parts = {}
    mdm = kd = None
    logp = student_logprobs(logits)  # (K, V) at T = 1, shared by both terms; KD tempers from it
    if per_row or cfg.lam < 1.0:
        mdm = mdm_loss(logp, batch.input_ids[batch.mask], row, norm, weight, per_row=per_row)
        parts["mdm"] = float(mdm.detach().mean())
    if per_row or cfg.lam > 0.0:
        tail = cfg.tail if cfg.tail != "auto" else ("renormalize" if spec.exact_support else "bucket")
        slack = None
        if tail == "bucket":  # a leftover within the storage rounding is no tail; exact supports have none
            tl = batch.target_logprobs
            slack = tl.new_full(tl.shape[:1], math.inf) if spec.exact_support else storage_slack(tl, spec.logprob_dtype)
        kd = kd_loss(logp, batch.target_ids, batch.target_logprobs, row, norm, cfg.temperature, tail, slack,
                     per_row=per_row)  # fmt: skip
        parts["kd"] = float(kd.detach().mean())
    if per_row:
        parts["lambda"] = float(lam.mean())
    loss = combined_loss(mdm, kd, lam)
    parts["loss"] = float(loss.detach())
    return loss, parts


def _nonfinite(what: str, step: int, saved: int | None, run: Path) -> str:
    kept = f"the checkpoint of step {saved} in {run} is kept" if saved is not None else "no checkpoint was written yet"
    return (f"step {step}: non-finite {what}; stopped before the update ({kept}); "
            "lower --lr or --temperature, or check the shards with `kdtargets validate`")


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


def resolve_device(device: str) -> str:
    """"auto" -> cuda when available, else cpu."""
    return device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")


def autocast_for(device: str, dtype: str):
    """Mixed precision for the forward: auto = bf16 autocast on CUDA, fp32 on CPU; float32 = none."""
    kind = "cuda" if device.startswith("cuda") else "cpu"
    if dtype == "float32" or (dtype == "auto" and kind == "cpu"):
        return torch.autocast(kind, enabled=False)
    return torch.autocast(kind, dtype=torch.bfloat16 if dtype in ("auto", "bfloat16") else torch.float16)


def _dist() -> tuple[int, int, bool]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        torch.distributed.init_process_group(backend)
    rank = torch.distributed.get_rank() if world > 1 else 0
    return rank, world, world > 1


def build_student(cfg: TrainConfig, manifest: Manifest) -> Student:
    if cfg.init_from:
        from ar2mdm.train.init import student_from_ar

        return student_from_ar(cfg.init_from, manifest.tokenizer.vocab_size, manifest.tokenizer.sha256, manifest.seq_len,
                               shift=cfg.shift)  # fmt: skip
    sc = StudentConfig.from_spec(cfg.student, manifest.tokenizer.vocab_size, manifest.seq_len, shift=cfg.shift)
    return Student(sc)


def run_training(cfg: TrainConfig) -> dict:
    """Train (or resume) a student; returns the final metrics. Raises UserError on bad input."""
    cfg.check()
    shards = Path(cfg.shards)
    manifest = load_shard_manifest(shards, cfg.allow_partial)
    if cfg.resample_masks and (manifest.mask_dependent_targets or not manifest.targets_at_all_positions):
        raise UserError(
            "--resample-masks needs targets at every position that do not depend on the mask "
            f"(build with --positions all and --mode topk or fim); these shards are mode {manifest.mode}, "
            f"positions {manifest.params.get('positions')}"
        )
    if TargetSpec.from_manifest(manifest).sampled and cfg.temperature != 1.0 and cfg.lam > 0:
        raise UserError(f"--temperature {cfg.temperature}: these shards hold sampled targets (--sparsify sample), an "
                        "unbiased estimate of q at T = 1 only; train them at --temperature 1, or build top-N targets")  # fmt: skip
    run = Path(cfg.out or Path("runs") / shards.resolve().name)
    rank, world, distributed = _dist()
    device = resolve_device(cfg.device)
    if device == "cuda" and distributed:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)

    meta = {"mask_id": manifest.tokenizer.vocab_size, "tokenizer_sha256": manifest.tokenizer.sha256,
            "shards": str(shards.resolve()), "train": cfg.to_dict(), "seq_len": manifest.seq_len,
            "task": manifest.task, "sft_format": manifest.sft_format}  # fmt: skip
    state = None
    if cfg.resume:
        old = load_meta(run)
        if old["tokenizer_sha256"] != manifest.tokenizer.sha256:
            raise UserError(f"--resume: {run} was trained with another tokenizer than the shards in {shards}")
        if cfg.init_from is None and old["student"] != StudentConfig.from_spec(cfg.student, manifest.tokenizer.vocab_size, manifest.seq_len, shift=cfg.shift).to_dict():
            raise UserError(f"--resume: the checkpoint in {run} has another student config than --student {cfg.student}")
        model, _ = load_student(run)
        model.train()
        state = torch.load(checkpoint_dir(run) / "state.pt", weights_only=False)
    else:
        if (run / "checkpoint").exists():
            raise UserError(f"{run} already holds a checkpoint; pass --resume to continue it or choose another --out")
        model = build_student(cfg, manifest)
    model.to(device)
    mask_id = model.config.mask_id

    # data: a fixed number of steps per epoch, the same on every rank, so DDP ranks never wait on each other
    loader_kw = dict(shuffle_buffer=cfg.shuffle_buffer, resample_masks=cfg.resample_masks,
                     mask_eps=float(manifest.params.get("mask_eps", 1e-3)))  # fmt: skip
    rows_per_rank = min(RowStream(shards, manifest, r, world, cfg.seed).rows_per_epoch(manifest) for r in range(world))
    steps_per_epoch = max(1, rows_per_rank // (cfg.batch_size * cfg.grad_accum))
    total = cfg.epochs * steps_per_epoch if cfg.steps is None else cfg.steps
    if rank == 0:  # say what the run will do before it starts
        per_step = cfg.batch_size * cfg.grad_accum
        print(f"kdtrain: {rows_per_rank} rows per rank x {world} rank(s), {per_step} rows per step and rank -> "
              f"{steps_per_epoch} steps per epoch; {total} steps = {total * per_step / max(rows_per_rank, 1):.2f} epochs; "
              f"λ = {cfg.lam} ({cfg.schedule})",
              file=sys.stderr, flush=True)  # fmt: skip
        if rows_per_rank < per_step:
            warn(f"fewer rows per rank ({rows_per_rank}) than one step takes ({per_step}): every step repeats rows; "
                 "lower --batch-size or build more rows")  # fmt: skip
    step = state["step"] if state else 0
    saved = step if state else None  # the step of the last checkpoint on disk
    rows_done = state["rows"] if state else 0

    fsdp = cfg.fsdp and distributed
    train_model = model
    if distributed:
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.model.layers:
                fully_shard(layer)
            fully_shard(model)
        else:
            train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device] if device.startswith("cuda") else None)
    if cfg.compile:
        train_model = torch.compile(train_model)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.95), fused=False)  # fmt: skip
    if state:
        if fsdp:  # the checkpoint holds the full optimizer state; each rank keeps its shard of it
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

            set_optimizer_state_dict(model, opt, state["optimizer"], options=StateDictOptions(full_state_dict=True))
        else:
            opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])

    loader = torch.utils.data.DataLoader(
        BatchLoader(shards, manifest, rank, world, cfg.seed, cfg.batch_size, skip_batches=rows_done // cfg.batch_size, **loader_kw),
        batch_size=None, num_workers=cfg.num_workers,
    )  # fmt: skip
    it = iter(loader)
    run.mkdir(parents=True, exist_ok=True)
    metrics_f = open(run / "metrics.jsonl", "a") if rank == 0 else None
    tracker = open_tracker(cfg.report_to, run, cfg.to_dict()) if rank == 0 else None  # metrics.jsonl always
    if tracker:
        print(f"kdtrain: metrics also to {tracker.where}", file=sys.stderr)
    tok_dir = shards / "tokenizer"
    spec = TargetSpec.from_manifest(manifest)
    autocast = autocast_for(device, cfg.dtype)
    from tqdm import tqdm

    bar = tqdm(total=total, initial=step, unit="step", desc="kdtrain", disable=not cfg.progress or rank != 0, file=sys.stderr, dynamic_ncols=True)
    t_last, tokens = time.time(), 0
    last = {}
    end = min(total, cfg.stop_at) if cfg.stop_at else total

    def save(at: int) -> None:
        model_sd, opt_sd = full_states(model, opt, fsdp)  # a collective under FSDP: every rank takes part
        if rank == 0:
            st = {"step": at, "rows": rows_done, "optimizer": opt_sd, "torch_rng": torch.get_rng_state()}
            save_checkpoint(run, model_sd, model.config, meta, st, tok_dir)

    while step < end:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, total, cfg)
        opt.zero_grad(set_to_none=True)
        parts_acc: dict[str, float] = {}
        for _ in range(cfg.grad_accum):
            batch = next(it).to(device)
            rows_done += batch.input_ids.shape[0]
            tokens += batch.input_ids.numel()
            with autocast:
                loss, parts = step_losses(train_model, batch, cfg, mask_id, spec, step / max(total, 1))
            if not math.isfinite(parts["loss"]):
                raise UserError(_nonfinite(f"loss {parts['loss']}", step + 1, saved, run))
            (loss / cfg.grad_accum).backward()
            for k, v in parts.items():
                parts_acc[k] = parts_acc.get(k, 0.0) + v / cfg.grad_accum
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        if not math.isfinite(float(gnorm)):  # clipping would spread a NaN into every weight
            raise UserError(_nonfinite(f"gradient norm {float(gnorm)}", step + 1, saved, run))
        opt.step()
        step += 1
        now = time.time()
        last = {"step": step, **parts_acc, "lr": opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                "tokens_per_s": tokens * world / max(now - t_last, 1e-9), "epoch": rows_done / max(rows_per_rank, 1)}  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{parts_acc['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}")
        if metrics_f and (step % cfg.log_every == 0 or step == end):
            metrics_f.write(json.dumps(last) + "\n")
            metrics_f.flush()
            if tracker:
                tracker.log(last, step)
        if step % cfg.log_every == 0:
            t_last, tokens = now, 0
        if step % cfg.save_every == 0 or step == end:
            save(step)
            saved = step
    if total == 0 and not cfg.resume:  # --steps 0: the initial student (e.g. the warm start) as a checkpoint
        save(0)
    bar.close()
    if metrics_f:
        metrics_f.close()
    if tracker:
        tracker.close()
    if distributed:
        torch.distributed.barrier()
    return {"run": str(run), "steps": step, **last}
