"""`kdtrain`: train, evaluate and sample a masked-diffusion student on kdtargets shards. Thin: TrainConfig."""

from __future__ import annotations

import json
from typing import Optional

import typer

from ar2mdm.schemas import SchemaError
from ar2mdm.shared.errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Train a masked-diffusion student on kdtargets shards.")


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
def run(
    shards: str = typer.Argument(..., help="A kdtargets output folder."),
    out: Optional[str] = typer.Option(None, help="Run folder (default: runs/<shards folder name>)."),
    student: str = typer.Option("small", help="Preset (tiny, small, base) or a JSON file of StudentConfig fields."),
    init_from: Optional[str] = typer.Option(None, help="AR checkpoint (HF folder or .gguf) to adapt, same tokenizer."),
    ar_shift: Optional[bool] = typer.Option(None, "--ar-shift/--no-ar-shift",
                                            help="Predict x_i from the hidden state at i-1 (Dream). Default: on with --init-from."),
    lam: float = typer.Option(0.5, "--lambda", help="λ in (1-λ)·MDM + λ·KD."),
    temperature: float = typer.Option(1.0, help="KD temperature T."),
    tail: str = typer.Option("renormalize", help="renormalize | bucket: mass outside the stored support (docs/design.md)."),
    loss_weighting: str = typer.Option("seed", help="seed (no weight) | elbo (1/t, LLaDA/MDLM; forced masks corrected)."),
    resample_masks: bool = typer.Option(False, help="Fresh masks after epoch 0 (shards with --positions all only)."),
    steps: Optional[int] = typer.Option(None, help="Optimizer steps (default: --epochs over the shards); 0 saves the initial student."),
    stop_at: Optional[int] = typer.Option(None, help="Stop after this step (checkpointed); resume later with --resume."),
    epochs: int = typer.Option(1),
    batch_size: int = typer.Option(16, help="Rows per micro-batch per rank."),
    grad_accum: int = typer.Option(1),
    lr: float = typer.Option(3e-4),
    warmup: float = typer.Option(0.05, help="Warmup as a fraction of the steps."),
    weight_decay: float = typer.Option(0.1),
    clip: float = typer.Option(1.0),
    seed: int = typer.Option(0),
    resume: bool = typer.Option(False, help="Continue the checkpoint in --out exactly."),
    save_every: int = typer.Option(200),
    log_every: int = typer.Option(10),
    shuffle_buffer: int = typer.Option(1024),
    num_workers: int = typer.Option(0),
    device: str = typer.Option("auto"),
    compile: bool = typer.Option(False, help="torch.compile the student."),
    fsdp: bool = typer.Option(False, help="FSDP2 instead of DDP under torchrun."),
    progress: bool = typer.Option(True),
) -> None:
    """Train with (1-λ)·MDM + λ·T²·KL(q‖p_θ) on precomputed sparse teacher targets; never loads the teacher."""
    from ar2mdm.train.config import TrainConfig
    from ar2mdm.train.loop import run_training

    cfg = TrainConfig(
        shards=shards, out=out, student=student, init_from=init_from, ar_shift=ar_shift, lam=lam, temperature=temperature, tail=tail,
        loss_weighting=loss_weighting, resample_masks=resample_masks, steps=steps, stop_at=stop_at, epochs=epochs,
        batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup, weight_decay=weight_decay, clip=clip,
        seed=seed, resume=resume, save_every=save_every, log_every=log_every, shuffle_buffer=shuffle_buffer,
        num_workers=num_workers, device=device, compile=compile, fsdp=fsdp, progress=progress,
    )  # fmt: skip
    try:
        res = run_training(cfg)
    except (UserError, SchemaError) as e:
        _fail(str(e))
    typer.echo(json.dumps(res))


@app.command("eval")
def eval_(
    run: str = typer.Argument(..., help="A kdtrain run folder."),
    data: str = typer.Option(..., help="A corpus (file/folder) or a kdtargets shard folder."),
    seed: int = typer.Option(0),
    mc_samples: int = typer.Option(4, help="Mask draws per row (stratified numbers of masked tokens)."),
    max_rows: int = typer.Option(256),
    batch_size: int = typer.Option(16),
    device: str = typer.Option("cpu"),
    by_line: bool = typer.Option(False, help="Raw text: one document per non-empty line."),
    text_field: str = typer.Option("text", help="Raw .jsonl/.parquet: the field that holds the text."),
) -> None:
    """Held-out ELBO bound (nats/token) ± standard error, masked-token accuracy, KD loss; last line: JSON."""
    from ar2mdm.train.evaluate import evaluate

    try:
        res = evaluate(run, data, seed, mc_samples, batch_size, max_rows, device, by_line, text_field)
    except (UserError, SchemaError) as e:
        _fail(str(e))
    typer.echo(json.dumps(res))


@app.command()
def sample(
    run: str = typer.Argument(...),
    prompt: str = typer.Option(""),
    length: int = typer.Option(32),
    steps: int = typer.Option(32),
    device: str = typer.Option("cpu"),
) -> None:
    """Generate with LLaDA's low-confidence remasking sampler."""
    from ar2mdm.train.evaluate import sample as do_sample

    try:
        typer.echo(do_sample(run, prompt, length, steps, device))
    except UserError as e:
        _fail(str(e))


@app.command()
def plot(run: str = typer.Argument(...), out: Optional[str] = typer.Option(None)) -> None:
    """Write a PNG of the loss curves (RUN/loss.png)."""
    from ar2mdm.train.evaluate import plot as do_plot

    try:
        typer.echo(str(do_plot(run, out)))
    except UserError as e:
        _fail(str(e))


if __name__ == "__main__":
    app()
