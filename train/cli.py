"""`kdtrain`: train, evaluate and sample a masked-diffusion student on kdtargets shards. Thin: TrainConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ar2mdm.schemas import SchemaError
from ar2mdm.shared.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train a masked-diffusion student on kdtargets shards."
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    shards: str = typer.Argument(..., help="A kdtargets output folder."),
    out: Optional[str] = typer.Option(None, help="Run folder (default: runs/<shards folder name>)."),
    student: str = typer.Option("small", help="Preset (tiny, small, base) or a JSON file of StudentConfig fields."),
    init_from: Optional[str] = typer.Option(
        None,
        help="AR checkpoint to adapt (HF folder, .gguf, 'default': the embedded teacher, or 'code': the fim code "
        "teacher), same tokenizer as the shards.",
    ),
    ar_shift: Optional[bool] = typer.Option(
        None,
        "--ar-shift/--no-ar-shift",
        help="Predict x_i from the hidden state at i-1 (Dream). Default: on with --init-from.",
    ),
    lam: float = typer.Option(0.5, "--lambda", help="λ in (1-λ)·MDM + λ·KD."),
    lambda_schedule: str = typer.Option(
        "auto",
        help="λ over training: auto (linear-warmup with --init-from, else constant) | "
        "constant | linear-decay | cosine-decay | linear-warmup.",
    ),
    lambda_t: str = typer.Option("none", help="λ over each row's mask ratio t: none | low-t (2(1-t)) | high-t (2t)."),
    temperature: float = typer.Option(1.0, help="KD temperature T."),
    tail: str = typer.Option(
        "auto",
        help="Mass outside the stored support: auto (bucket when the shards have a tail, "
        "else renormalize) | renormalize | bucket (docs/design.md).",
    ),
    loss_weighting: str = typer.Option(
        "seed", help="seed (no weight) | elbo (1/t, LLaDA/MDLM; forced masks corrected)."
    ),
    resample_masks: bool = typer.Option(False, help="Fresh masks after epoch 0 (shards with --positions all only)."),
    allow_partial: bool = typer.Option(
        False, help="Train on a build whose ranks have not all finished (refused by default)."
    ),
    steps: Optional[int] = typer.Option(
        None, help="Optimizer steps (default: --epochs over the shards); 0 saves the initial student."
    ),
    stop_at: Optional[int] = typer.Option(
        None, help="Stop after this step (checkpointed); resume later with --resume."
    ),
    epochs: int = typer.Option(1, help="Passes over the shards (when --steps is not given)."),
    batch_size: int = typer.Option(16, help="Rows per micro-batch per rank."),
    grad_accum: int = typer.Option(1, help="Micro-batches per optimizer step."),
    lr: float = typer.Option(3e-4, help="Peak learning rate (AdamW; linear warmup, cosine decay to 0.1x)."),
    warmup: float = typer.Option(0.05, help="Warmup as a fraction of the steps."),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay (matrices only)."),
    clip: float = typer.Option(1.0, help="Gradient-norm clipping."),
    seed: int = typer.Option(0, help="Seed of the student's init and of the data order."),
    resume: bool = typer.Option(False, help="Continue the checkpoint in --out exactly."),
    save_every: int = typer.Option(200, help="Checkpoint every N steps (and at the end)."),
    log_every: int = typer.Option(10, help="Append a line to RUN/metrics.jsonl (and to --report-to) every N steps."),
    report_to: str = typer.Option(
        "none",
        help="Also log to: none | tensorboard (RUN/tb) | wandb (offline without a W&B key); pip install "
        "'ar2mdm[track]'.",
    ),
    shuffle_buffer: int = typer.Option(1024, help="Rows held for shuffling the stream."),
    num_workers: int = typer.Option(0, help="DataLoader worker processes reading shards."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option(
        "auto", help="Autocast: auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16."
    ),
    compile: bool = typer.Option(False, help="torch.compile the student."),
    fsdp: bool = typer.Option(False, help="FSDP2 instead of DDP under torchrun."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Train with (1-λ)·MDM + λ·T²·KL(q‖p_θ) on precomputed sparse teacher targets; never loads the teacher."""
    from ar2mdm.train.config import TrainConfig

    cfg = TrainConfig(
        shards=shards,
        out=out,
        student=student,
        init_from=init_from,
        ar_shift=ar_shift,
        lam=lam,
        lambda_schedule=lambda_schedule,
        lambda_t=lambda_t,
        temperature=temperature,
        tail=tail,
        loss_weighting=loss_weighting,
        resample_masks=resample_masks,
        steps=steps,
        stop_at=stop_at,
        epochs=epochs,
        batch_size=batch_size,
        grad_accum=grad_accum,
        lr=lr,
        warmup=warmup,
        weight_decay=weight_decay,
        clip=clip,
        seed=seed,
        resume=resume,
        save_every=save_every,
        log_every=log_every,
        shuffle_buffer=shuffle_buffer,
        num_workers=num_workers,
        device=device,
        dtype=dtype,
        compile=compile,
        fsdp=fsdp,
        progress=progress,
        report_to=report_to,
        allow_partial=allow_partial,
    )
    try:  # settings and paths first: a mistake costs a second, not the import of torch
        cfg.check()
        cfg.check_paths()
    except UserError as e:
        _fail(str(e))
    from ar2mdm.train.loop import run_training

    try:
        res = run_training(cfg)
    except (UserError, SchemaError) as e:
        _fail(str(e))
    typer.echo(json.dumps(res))


@app.command("eval")
def eval_(
    run: str = typer.Argument(..., help="A kdtrain run folder."),
    data: str = typer.Option(
        ..., help="A corpus (file/folder, save_to_disk dataset, hf:NAME) or a kdtargets shard folder."
    ),
    seed: int = typer.Option(0, help="Seed of the evaluation masks (the same seed gives every run the same masks)."),
    mc_samples: int = typer.Option(4, help="Mask draws per row (stratified numbers of masked tokens)."),
    max_rows: int = typer.Option(256, help="Rows evaluated (the first ones)."),
    batch_size: int = typer.Option(16, help="Rows per forward."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    by_line: bool = typer.Option(False, help="Raw text: one document per non-empty line."),
    text_field: str = typer.Option("text", help="Raw .jsonl/.parquet/dataset: the field that holds the text."),
    split: str = typer.Option("test", help="A dataset --data: the split evaluated."),
    task: str = typer.Option(
        "auto",
        help="auto (the run's own) | pretrain | sft: --data holds chats (messages, or prompt + response), scored on "
        "the responses only.",
    ),
    messages_field: str = typer.Option("messages", help="--task sft: the field of the rows holding a chat."),
) -> None:
    """Held-out ELBO bound (nats/token) ± standard error, masked-token accuracy, KD loss; last line: JSON."""
    from ar2mdm.train.evaluate import evaluate

    try:
        res = evaluate(
            run,
            data,
            seed,
            mc_samples,
            batch_size,
            max_rows,
            device,
            by_line,
            text_field,
            split=split,
            task=task,
            messages_field=messages_field,
        )
    except (UserError, SchemaError) as e:
        _fail(str(e))
    scope = "response tokens" if res["task"] == "sft" else "tokens"
    typer.echo(
        f"nll_bound {res['nll_bound']:.3f} ± {res['nll_bound_se']:.3f} nats per token over {res['tokens']} "
        f"{scope} of {res['rows']} rows (lower is better; a uniform guess scores log V = {res['uniform_nll']:.2f})"
    )
    typer.echo(json.dumps(res))


@app.command()
def sample(
    run: str = typer.Argument(..., help="A kdtrain run folder."),
    prompt: str = typer.Option("", help="Text the completion follows (kept fixed)."),
    length: int = typer.Option(32, help="Tokens to generate."),
    steps: int = typer.Option(32, help="Denoising steps (at most --length); fewer steps reveal more tokens each."),
    temperature: float = typer.Option(0.0, help="0: greedy predictions; > 0: sample them at this temperature."),
    remasking: str = typer.Option("low-confidence", help="low-confidence (reveal the most confident, LLaDA) | random."),
    seed: int = typer.Option(0, help="Seed of the sampling and of random remasking."),
    raw: bool = typer.Option(
        False, help="Print prompt + completion as plain text (default: labelled, newlines shown as \\n)."
    ),
    chat: Optional[bool] = typer.Option(
        None,
        "--chat/--no-chat",
        help="The prompt is a user turn, rendered as the SFT build rendered its chats, and the answer stops at its "
        "first end of turn. Default: on for SFT runs.",
    ),
    block_length: Optional[int] = typer.Option(
        None,
        help="Reveal the completion block by block, left to right (LLaDA's semi-autoregressive decoding; --steps "
        "shared among the blocks). Default: the whole length at once.",
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Generate with LLaDA's remasking sampler; prints the prompt and the completion."""
    from ar2mdm.train.evaluate import sample as do_sample

    try:
        p, c = do_sample(run, prompt, length, steps, device, seed, temperature, remasking, chat, block_length)
    except UserError as e:
        _fail(str(e))
    if raw:
        typer.echo(p + c)
    else:
        typer.echo(f"prompt:     {_visible(p)}")
        typer.echo(f"completion: {_visible(c)}")


@app.command()
def fill(
    run: str = typer.Argument(..., help="A kdtrain run folder."),
    text: str = typer.Option(..., help="Text with [MASK] where the student predicts one token each."),
    top: int = typer.Option(5, help="Predictions shown per mask."),
    chat: bool = typer.Option(
        False, help="--text is the answer to the user turn --prompt, rendered as the SFT build renders a chat."
    ),
    prompt: str = typer.Option("", help="--chat: the user's turn that --text answers."),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
) -> None:
    """Show the student's top predictions for each [MASK] of a sentence (all masks predicted at once)."""
    from ar2mdm.train.evaluate import fill as do_fill

    try:
        preds = do_fill(run, text, top, device, chat, prompt)
    except UserError as e:
        _fail(str(e))
    typer.echo(text)
    for j, cands in enumerate(preds, 1):
        typer.echo(f"[MASK] {j}: " + "  ".join(f"{_visible(t)!s:>8} {p:.3g}" for t, p in cands))


@app.command()
def export(
    run: str = typer.Argument(..., help="A kdtrain run folder."),
    out: str = typer.Option(
        ..., help="Folder to write (config.json, model.safetensors, tokenizer, modeling_ar2mdm.py)."
    ),
    overwrite: bool = typer.Option(False, help="Replace a non-empty --out."),
) -> None:
    """Export the student as a transformers folder (AutoModelForMaskedLM.from_pretrained, trust_remote_code)."""
    from ar2mdm.train.export import export as do_export

    try:
        d = do_export(run, out, overwrite)
    except UserError as e:
        _fail(str(e))
    typer.echo(
        f"exported {run} -> {d} (load it with AutoModelForMaskedLM.from_pretrained({str(d)!r}, trust_remote_code=True))"
    )


def _visible(text: str) -> str:
    """One line: newlines and tabs written as \\n and \\t, so a completion of newlines is not a blank screen."""
    return text.replace("\\", "\\\\").replace("\n", "\\n").replace("\t", "\\t")


@app.command()
def plot(
    runs: list[str] = typer.Argument(..., help="One run folder, or several to overlay (a sweep)."),
    out: Optional[str] = typer.Option(None, help="PNG path (default: RUN/loss.png; several runs: runs.png)."),
) -> None:
    """Write a PNG of the loss curves (RUN/loss.png), or overlay several runs."""
    from ar2mdm.train.evaluate import plot as do_plot

    try:
        typer.echo(str(do_plot(runs, out)))
    except UserError as e:
        _fail(str(e))


@app.command()
def sweep(
    shards: str = typer.Argument(..., help="A kdtargets output folder (one precompute for every point)."),
    out: str = typer.Option(..., help="Sweep folder: one run per point, sweep.csv, sweep.md, sweep.png."),
    grid: list[str] = typer.Option(
        [],
        help="KEY=V1,V2 over any `kdtrain run` setting (lambda, temperature, tail, "
        "student, lr, steps, init_from, lambda_schedule, seed, ...); repeatable.",
    ),
    set_: list[str] = typer.Option([], "--set", help="KEY=VALUE for every point (e.g. steps=300); repeatable."),
    eval_data: str = typer.Option(..., help="Held-out corpus (or shards) the students never train on."),
    eval_rows: int = typer.Option(256, help="Held-out rows evaluated per point (the same rows and masks for all)."),
    eval_samples: int = typer.Option(4, help="Mask draws per held-out row."),
    by_line: bool = typer.Option(False, help="Held-out raw text: one document per non-empty line."),
    text_field: str = typer.Option("text", help="Held-out .jsonl/.parquet: the field that holds the text."),
    parallel: int = typer.Option(
        1, help="Points trained at once (one GPU each when there are GPUs, else CPUs shared)."
    ),
) -> None:
    """Train and evaluate a grid of students on one precompute; finished points are skipped on a rerun."""
    from ar2mdm.train.sweep import SweepConfig, parse_assignments, run_sweep

    try:
        cfg = SweepConfig(
            shards=shards,
            out=out,
            grid=parse_assignments(grid, True),
            fixed=parse_assignments(set_, False),
            eval_data=eval_data,
            eval_rows=eval_rows,
            eval_samples=eval_samples,
            by_line=by_line,
            text_field=text_field,
            parallel=parallel,
        )
        run_sweep(cfg)
    except (UserError, SchemaError) as e:
        _fail(str(e))
    typer.echo((Path(out) / "sweep.md").read_text())


if __name__ == "__main__":
    app()
