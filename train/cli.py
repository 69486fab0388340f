"""`kdtrain`: train, evaluate and sample a masked-diffusion student on kdtargets shards. Thin: TrainConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ar2mdm.schemas import SchemaError
from ar2mdm.shared.cpus import passive_threads_when_busy
from ar2mdm.shared.errors import UserError, fail
from ar2mdm.shared.settings import cli_signature
from ar2mdm.train.config import EvalConfig, FillConfig, LmEvalConfig, SampleConfig, TrainConfig
from ar2mdm.train.sweep import SweepConfig

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Train a masked-diffusion student on kdtargets shards."
)


@app.command()
@cli_signature(TrainConfig)
def run(**settings) -> None:
    """Train with (1-λ)·MDM + λ·T²·KL(q‖p_θ) on precomputed sparse teacher targets; never loads the teacher."""
    cfg = TrainConfig(**settings)
    try:  # settings and paths first: a mistake costs a second, not the import of torch
        cfg.check()
        cfg.check_paths()
    except UserError as e:
        fail(str(e))
    passive_threads_when_busy("kdtrain")  # before torch starts OpenMP (shared/cpus.py: measured)
    from ar2mdm.train.loop import run_training

    try:
        res = run_training(cfg)
    except (UserError, SchemaError) as e:
        fail(str(e))
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
        fail(str(e))
    scope = "response tokens" if res["task"] == "sft" else "tokens"
    typer.echo(
        f"nll_bound {res['nll_bound']:.3f} ± {res['nll_bound_se']:.3f} nats per token over {res['tokens']} "
        f"{scope} of {res['rows']} rows (lower is better; a uniform guess scores log V = {res['uniform_nll']:.2f})"
    )
    for what, rows in res.get("by_level", {}).items():
        typer.echo(f"by masking level ({'share masked' if what == 'bound' else 'the rows t, their own masks'}):")
        names = [k for k in rows[0] if k not in ("level", "positions")]
        typer.echo("  level      positions  " + "  ".join(f"{n:>9}" for n in names))
        for r in rows:
            vals = "  ".join(f"{r[n]:>9.3f}" if r[n] is not None else f"{'-':>9}" for n in names)
            typer.echo(f"  {r['level']:<10} {r['positions']:>9}  {vals}")
    typer.echo(json.dumps(res))


@app.command()
@cli_signature(SampleConfig)
def sample(**settings) -> None:
    """Draw samples in batches; print them, or write them as JSONL (--out), and the states they visited (--states)."""
    cfg = SampleConfig(**settings)
    try:
        cfg.check()
        from ar2mdm.train.sample import sample as do_sample

        records, states = do_sample(cfg)
        if cfg.out:
            from ar2mdm.schemas.samples import write_samples

            write_samples(cfg.out, records)
        if cfg.states:
            from ar2mdm.schemas.states import write_states

            write_states(cfg.states, states)
    except (UserError, SchemaError) as e:
        fail(str(e))
    if cfg.states:
        typer.echo(f"{cfg.states}: {len(states)} states of {len(records)} trajectories")
    if cfg.out:
        stopped = sum(r.stopped for r in records)
        per = sum(len(r.ids) for r in records) / max(1, sum(r.forwards for r in records))
        typer.echo(
            f"{cfg.out}: {len(records)} samples of {cfg.length} tokens, {per:.2f} tokens per forward ({stopped} ended "
            "early)"
        )
    if cfg.out or cfg.states:
        return
    for r in records:
        if cfg.raw:
            typer.echo(r.prompt + r.text)
            continue
        tag = f"[{r.index}] " if len(records) > 1 else ""
        typer.echo(f"{tag}prompt:     {_visible(r.prompt)}")
        typer.echo(f"{tag}completion: {_visible(r.text)}")


@app.command()
@cli_signature(FillConfig)
def fill(**settings) -> None:
    """Show the student's top predictions for each [MASK] of a sentence (all masks predicted at once)."""
    cfg = FillConfig(**settings)
    try:
        cfg.check()
        from ar2mdm.train.fill import fill as do_fill

        preds = do_fill(cfg)
    except UserError as e:
        fail(str(e))
    typer.echo(cfg.text)
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
        fail(str(e))
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
    from ar2mdm.train.plot import plot as do_plot

    try:
        typer.echo(str(do_plot(runs, out)))
    except UserError as e:
        fail(str(e))


@app.command()
@cli_signature(SweepConfig)
def sweep(**settings) -> None:
    """Train and evaluate a grid of students on one precompute; finished points are skipped on a rerun."""
    from ar2mdm.train.sweep import parse_assignments, run_sweep

    try:
        grid, fixed = parse_assignments(settings.pop("grid"), True), parse_assignments(settings.pop("fixed"), False)
        cfg = SweepConfig(grid=grid, fixed=fixed, **settings)
        run_sweep(cfg)
    except (UserError, SchemaError) as e:
        fail(str(e))
    typer.echo((Path(cfg.out) / "sweep.md").read_text())


@app.command("lm-eval")
@cli_signature(LmEvalConfig)
def lm_eval(**settings) -> None:
    """A student beside its teacher on the LM Evaluation Harness's tasks (the eval extra); last line: JSON."""
    cfg = LmEvalConfig(**settings)
    try:
        cfg.check()
        from ar2mdm.train.lm_eval_run import run_lm_eval

        res = run_lm_eval(cfg)
    except (UserError, SchemaError, ValueError) as e:
        fail(str(e).splitlines()[0] if str(e) else repr(e))
    typer.echo(f"{'task':<20} {'metric':<12} {'student':>16} {'teacher':>16} {'kept':>6}")
    for r in res["table"]:

        def cell(v, se):
            return "-" if v is None else f"{v:.3f}" + (f" ± {se:.3f}" if isinstance(se, float) else "")

        kept = f"{r['kept']:.2f}" if r.get("kept") is not None else "-"
        typer.echo(
            f"{r['task']:<20} {r['metric']:<12} {cell(r['student'], r['student_se']):>16} "
            f"{cell(r.get('teacher'), r.get('teacher_se')):>16} {kept:>6}"
        )
    if "tokens_per_forward" in res["student"]:
        typer.echo(f"the student's generations: {res['student']['tokens_per_forward']:.2f} tokens per forward")
    typer.echo(json.dumps({"run": res["run"], "teacher": res["teacher"], "table": res["table"]}))


if __name__ == "__main__":
    app()
