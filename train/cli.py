"""`kdtrain`: train, evaluate and sample a masked-diffusion student on kdtargets shards. Thin: TrainConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ar2mdm.schemas import SchemaError
from ar2mdm.shared.cpus import passive_threads_when_busy
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.settings import cli_signature
from ar2mdm.train.config import EvalConfig, SampleConfig, TrainConfig

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train a masked-diffusion student on kdtargets shards."
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@app.command()
@cli_signature(TrainConfig)
def run(**settings) -> None:
    """Train with (1-λ)·MDM + λ·T²·KL(q‖p_θ) on precomputed sparse teacher targets; never loads the teacher."""
    cfg = TrainConfig(**settings)
    try:  # settings and paths first: a mistake costs a second, not the import of torch
        cfg.check()
        cfg.check_paths()
    except UserError as e:
        _fail(str(e))
    passive_threads_when_busy("kdtrain")  # before torch starts OpenMP (shared/cpus.py: measured)
    from ar2mdm.train.loop import run_training

    try:
        res = run_training(cfg)
    except (UserError, SchemaError) as e:
        _fail(str(e))
    typer.echo(json.dumps(res))


@app.command("eval")
@cli_signature(EvalConfig)
def eval_(**settings) -> None:
    """Held-out ELBO bound (nats/token) ± standard error, masked-token accuracy, KD loss; last line: JSON."""
    cfg = EvalConfig(**settings)
    try:
        cfg.check()  # before torch is imported: a mistake costs a second
        from ar2mdm.train.evaluate import evaluate

        res = evaluate(cfg)
    except (UserError, SchemaError) as e:
        _fail(str(e))
    scope = "response tokens" if res["task"] == "sft" else "tokens"
    typer.echo(
        f"nll_bound {res['nll_bound']:.3f} ± {res['nll_bound_se']:.3f} nats per token over {res['tokens']} "
        f"{scope} of {res['rows']} rows (lower is better; a uniform guess scores log V = {res['uniform_nll']:.2f})"
    )
    typer.echo(json.dumps(res))


@app.command()
@cli_signature(SampleConfig)
def sample(**settings) -> None:
    """Generate with LLaDA's remasking sampler; prints the prompt and the completion."""
    cfg = SampleConfig(**settings)
    try:
        cfg.check()
        from ar2mdm.train.evaluate import sample as do_sample

        p, c = do_sample(cfg)
    except UserError as e:
        _fail(str(e))
    if cfg.raw:
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
