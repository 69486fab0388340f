"""`kdtargets`: build, inspect and validate sparse teacher-target shards. Thin: settings go into BuildConfig."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import typer

from ar2mdm.precompute.config import BuildConfig, ScoreConfig, TeacherSampleConfig
from ar2mdm.schemas import SchemaError
from ar2mdm.shared.cpus import passive_threads_when_busy
from ar2mdm.shared.errors import UserError, fail
from ar2mdm.shared.settings import cli_signature

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Precompute sparse AR-teacher soft targets for MDM distillation."
)


def _engine_args(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            fail(f"--engine takes KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k] = v
    return out


@app.command()
@cli_signature(BuildConfig, defaults={"rank": None, "world_size": None})  # None: from the launcher, else 0 of 1
def build(**settings) -> None:
    """Build sparse top-N soft targets for masked positions and write sharded Parquet/safetensors + manifest."""
    from ar2mdm.precompute.config import launcher_rank

    rank, world_size = settings["rank"], settings["world_size"]
    if rank is None or world_size is None:  # explicit flags win; the rest comes from the launcher
        try:
            launched = launcher_rank()
        except UserError as e:
            fail(str(e))
        if launched:
            rank = launched[0] if rank is None else rank
            world_size = launched[1] if world_size is None else world_size
            typer.echo(f"kdtargets: rank {rank} of {world_size} (from {launched[2]})", err=True)
    defaults = BuildConfig()
    settings.update(
        rank=defaults.rank if rank is None else rank,
        world_size=defaults.world_size if world_size is None else world_size,
        engine=_engine_args(settings["engine"]),
    )
    cfg = BuildConfig(**settings)
    try:  # settings and paths first: a mistake costs a second, not the imports of torch and transformers
        cfg.check()
        cfg.check_paths()
    except UserError as e:
        fail(str(e))
    passive_threads_when_busy("kdtargets")  # before torch starts OpenMP (shared/cpus.py: measured)
    from ar2mdm.precompute.build import Interrupted, run_build

    try:
        s = run_build(cfg)
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130)
    except (UserError, SchemaError) as e:
        fail(str(e))
    if s.empty_rank:
        typer.echo(
            f"{s.out}: rank {cfg.rank} of {cfg.world_size} has nothing to do ({s.empty_rank}); finished with 0 shards"
        )
        return
    typer.echo(
        f"{s.out}: wrote {s.shards_written} shards ({s.rows} rows, {s.target_positions} target positions), "
        f"skipped {s.shards_skipped} finished, {s.seconds:.1f}s ({s.backend} backend)"
        + (f", resumed {s.resumed_sequences} sequences of interrupted shards" if s.resumed_sequences else "")
    )
    if s.backend == "vllm":
        # The engine is shut down and every shard is on disk, but vLLM 0.32's threads abort the interpreter's
        # teardown ("terminate called without an active exception", exit 134): leave without it.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


@app.command()
@cli_signature(TeacherSampleConfig)
def sample(**settings) -> None:
    """Write the anchors a student's samples are judged beside: the teacher's own samples, or held-out text."""
    cfg = TeacherSampleConfig(**settings)
    try:
        cfg.check()
        from ar2mdm.precompute.sample import sample as do_sample
        from ar2mdm.schemas.samples import write_samples

        records = do_sample(cfg)
        if cfg.out:
            write_samples(cfg.out, records)
    except (UserError, SchemaError) as e:
        fail(str(e))
    if not cfg.out:
        for r in records:
            typer.echo(json.dumps({"prompt": r.prompt, "text": r.text}))
        return
    stopped = sum(r.stopped for r in records)
    typer.echo(f"{cfg.out}: {len(records)} samples ({cfg.source}) of up to {cfg.length} tokens ({stopped} ended early)")


@app.command()
@cli_signature(ScoreConfig)
def score(**settings) -> None:
    """Judge samples files: an AR judge's bits per byte and perplexity, the samples' entropy and distinct-n."""
    cfg = ScoreConfig(**settings)
    try:
        cfg.check()
        from ar2mdm.precompute.judge import Judge, check_tokenizers, score_file, table
        from ar2mdm.schemas.samples import read_samples

        files = {f: read_samples(f) for f in cfg.samples}
        check_tokenizers(files)
        judges = [Judge.load(j, cfg.device, cfg.dtype) for j in dict.fromkeys(cfg.judge)]
        scored = [score_file(f, recs, judges, cfg.batch_size) for f, recs in files.items()]
    except (UserError, SchemaError) as e:
        fail(str(e))
    from dataclasses import asdict

    from ar2mdm.schemas.manifest import write_atomic

    doc = {"judges": {j.name: {"path": j.path, "weights_sha256": j.weights_sha256} for j in judges}}
    doc["files"] = [asdict(f) for f in scored]
    write_atomic(Path(cfg.out), json.dumps(doc, indent=1).encode())
    typer.echo(table(scored))
    typer.echo(f"every figure, per sample too: {cfg.out}")


@app.command()
def inspect(
    directory: str = typer.Argument(..., help="A kdtargets output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Print a readable summary of a shard folder."""
    from ar2mdm.shared.validate import summarize_dir

    try:
        s = summarize_dir(directory)
    except (SchemaError, UserError) as e:
        fail(str(e))
    if as_json:
        typer.echo(json.dumps(s, indent=2))
        return
    width = max(map(len, s))
    for key, val in s.items():
        if isinstance(val, float):
            val = f"{val:.4f}"
        elif isinstance(val, dict):
            val = ", ".join(f"{k}={v}" for k, v in val.items())
        typer.echo(f"{key:>{width}}: {val}")


@app.command()
def validate(directory: str = typer.Argument(..., help="A kdtargets output folder.")) -> None:
    """Check schema, ids, log-probs, sums, sha256 and manifest consistency; exit 1 on the first problem."""
    from ar2mdm.shared.validate import ValidationError, validate_dir

    try:
        m = validate_dir(directory)
    except ValidationError as e:
        typer.echo(f"invalid: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(
        f"ok: {Path(directory)}: {len(m.shards)} shards, {sum(s.rows for s in m.shards)} rows, "
        f"{sum(s.target_positions for s in m.shards)} target positions, schema v{m.schema_version}"
    )


if __name__ == "__main__":
    app()
