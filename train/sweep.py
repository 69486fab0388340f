"""`kdtrain sweep`: one precompute, many students. A cartesian grid over `kdtrain run` settings, each point
trained and evaluated on held-out text with the same seed, data order and evaluation masks, so that the
differences between rows of the table are the settings'.

A point's folder holds its run and ``eval.json``; a rerun skips points with both (and resumes a point whose
checkpoint stopped early). Points run one after another, or ``--parallel N`` at a time in worker processes
(one GPU each when there are GPUs, else the CPUs shared among them).
"""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
import os
import time
import typing
from dataclasses import dataclass
from pathlib import Path

from ar2mdm.shared.errors import UserError
from ar2mdm.shared.settings import check_settings, field_of, flag_of, setting, words_of
from ar2mdm.train.checkpoint import CKPT
from ar2mdm.train.config import TrainConfig

NOT_SWEPT = {"shards", "out", "resume", "progress", "stop_at"}


@dataclass
class SweepConfig:
    """Every setting of `kdtrain sweep`."""

    shards: str = setting(
        dataclasses.MISSING, "A kdtargets output folder (one precompute for every point).", argument=True
    )
    out: str | None = setting(None, "Sweep folder: one run per point, sweep.csv, sweep.md, sweep.png (required).")
    grid: dict[str, list] = setting(
        {},
        "KEY=V1,V2 over any `kdtrain run` setting (lambda, temperature, tail, student, lr, steps, init_from, "
        "lambda_schedule, seed, ...); repeatable.",
    )  # TrainConfig field -> values
    fixed: dict[str, object] = setting(
        {}, "KEY=VALUE for every point (e.g. steps=300); repeatable.", flag="--set"
    )  # TrainConfig field -> value, every point
    eval_data: str | None = setting(None, "Held-out corpus (or shards) the students never train on (required).")
    eval_rows: int = setting(256, "Held-out rows evaluated per point (the same rows and masks for all).", at_least=1)
    eval_mask_draws: int = setting(4, "Mask draws per held-out row.", at_least=1)
    eval_seed: int = 0  # API only: the seed of the evaluation masks
    by_line: bool = setting(False, "Held-out raw text: one document per non-empty line.")
    text_field: str = setting("text", "Held-out .jsonl/.parquet: the field that holds the text.")
    parallel: int = setting(
        1, "Points trained at once (one GPU each when there are GPUs, else CPUs shared).", at_least=1
    )

    def check(self) -> None:
        check_settings(self)
        if not self.out:
            raise UserError("--out: the sweep folder is needed")
        if not self.eval_data:
            raise UserError("--eval-data: held-out text (or shards) the students never train on is needed")
        for name, values in self.grid.items():
            if not values:
                raise UserError(f"--grid {name}: no values")


def _field_type(name: str):
    hints = typing.get_type_hints(TrainConfig)
    if name not in hints or name in NOT_SWEPT:
        settable = sorted(set(hints) - NOT_SWEPT)
        raise UserError(f"--grid/--set {name}: not a kdtrain run setting (one of: {', '.join(settable)})")
    return hints[name]


def parse_value(name: str, text: str):
    """A setting's value from text, by the TrainConfig field's type ('none' for an optional one)."""
    typ = _field_type(name)
    args = [a for a in typing.get_args(typ) if a is not type(None)]
    if text.lower() == "none" and type(None) in typing.get_args(typ):
        return None
    if text in (words_of(typ) or ()):  # batch_size=auto
        return text
    base = args[0] if args and typing.get_origin(typ) is not typing.Literal else typ
    if typing.get_origin(typ) is typing.Literal:
        return text
    try:
        if base is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return text.lower() in ("true", "1")
        return base(text) if base in (int, float) else text
    except ValueError:
        raise UserError(f"--grid/--set {name}: {text!r} is not a {getattr(base, '__name__', base)}") from None


def parse_assignments(items: list[str], many: bool) -> dict:
    """["lambda=0,0.5", "temperature=1,2"] -> {"lam": [0.0, 0.5], "temperature": [1.0, 2.0]} (or single values)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise UserError(f"expected KEY=VALUE{'S' if many else ''}, got {item!r}")
        key, vals = item.split("=", 1)
        name = field_of(TrainConfig, key)  # the CLI's spelling (lambda, batch-size) or the field's (lam)
        parsed = [parse_value(name, v.strip()) for v in vals.split(",")] if many else parse_value(name, vals.strip())
        out[name] = parsed
    return out


def point_name(point: dict) -> str:
    return ",".join(f"{flag_of(TrainConfig, k)}={v}" for k, v in point.items()) or "base"


def points(cfg: SweepConfig) -> list[dict]:
    keys = list(cfg.grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(cfg.grid[k] for k in keys))]


def run_point(cfg: SweepConfig, point: dict) -> dict:
    """Train one point (or resume it) and evaluate it on the held-out data; returns its result row.

    ``train.json`` and ``eval.json`` mark the two steps done: deleting ``eval.json`` re-evaluates a point
    without retraining it. The per-row estimates are kept for paired comparisons (`write_results`).
    """
    from ar2mdm.train.config import EvalConfig
    from ar2mdm.train.evaluate import evaluate
    from ar2mdm.train.loop import run_training

    run = Path(cfg.out) / point_name(point)
    done = run / "eval.json"
    if done.exists():
        return json.loads(done.read_text())
    tc = TrainConfig(shards=cfg.shards, out=str(run), progress=False, **{**cfg.fixed, **point})
    trained = run / "train.json"
    if not trained.exists():
        t0 = time.time()
        tc.resume = (run / CKPT).exists()
        res = run_training(tc)
        res["wall_s"] = round(time.time() - t0, 1)
        trained.write_text(json.dumps(res))
    res = json.loads(trained.read_text())
    ev = evaluate(
        EvalConfig(
            run=str(run),
            data=cfg.eval_data,
            seed=cfg.eval_seed,
            mask_draws=cfg.eval_mask_draws,
            max_rows=cfg.eval_rows,
            device=tc.device,
            by_line=cfg.by_line,
            text_field=cfg.text_field,
            row_estimates=True,
        )
    )
    row = {
        "name": point_name(point),
        **{flag_of(TrainConfig, k): v for k, v in point.items()},
        "nll_bound": ev["nll_bound"],
        "nll_bound_se": ev["nll_bound_se"],
        "ppl_bound": ev["ppl_bound"],
        "masked_token_accuracy": ev["masked_token_accuracy"],
        "eval_rows": ev["rows"],
        "steps": res["steps"],
        "train_loss": res.get("loss"),
        "train_mdm": res.get("mdm"),
        "train_kd": res.get("kd"),
        "tokens_per_s": res.get("tokens_per_s"),
        "wall_s": res["wall_s"],
        "row_nll": ev["row_nll"],
        "row_tokens": ev["row_tokens"],
    }
    done.write_text(json.dumps(row))
    return row


def _worker_init(devices, threads: int) -> None:
    """A sweep worker: one GPU of its own (CUDA_VISIBLE_DEVICES before CUDA starts), or a share of the CPUs."""
    import torch

    if devices is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = str(devices.get())
    torch.set_num_threads(threads)


def run_sweep(cfg: SweepConfig) -> list[dict]:
    """Every point of the grid, trained and evaluated; writes sweep.csv, sweep.md and sweep.png in ``out``."""
    cfg.check()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=2, default=str))
    todo = points(cfg)
    if cfg.parallel == 1 or len(todo) == 1:
        rows = [run_point(cfg, p) for p in todo]
    else:
        import multiprocessing as mp
        from concurrent.futures import ProcessPoolExecutor

        import torch

        ctx = mp.get_context("spawn")
        gpus = torch.cuda.device_count()
        devices = None
        if gpus:
            devices = ctx.Manager().Queue()
            for d in range(min(gpus, cfg.parallel)):
                devices.put(d)
        n = min(cfg.parallel, gpus) if gpus else cfg.parallel
        threads = max(1, len(os.sched_getaffinity(0)) // n)
        with ProcessPoolExecutor(n, mp_context=ctx, initializer=_worker_init, initargs=(devices, threads)) as ex:
            rows = list(ex.map(run_point, [cfg] * len(todo), todo))
    write_results(out, rows, list(cfg.grid))
    return rows


def paired_diff(r: dict, base: dict) -> tuple[float, float]:
    """(nll_bound(r) - nll_bound(base), standard error of the per-row paired differences) of two eval.json
    results on the same held-out rows and masks."""
    import torch

    from ar2mdm.shared.stats import ratio_se

    d = torch.tensor(r["row_nll"], dtype=torch.float64) - torch.tensor(base["row_nll"], dtype=torch.float64)
    tok = torch.tensor(r["row_tokens"], dtype=torch.float64)
    return float(d.sum() / tok.sum()), ratio_se(d.numpy(), tok.numpy())


def paired_delta(r: dict, base: dict) -> str:
    """nll_bound(r) - nll_bound(base) with the standard error of the per-row paired differences."""
    if r is base:
        return "0"
    if not r.get("row_nll") or len(r["row_nll"]) != len(base.get("row_nll") or []):
        return "-"
    d, se = paired_diff(r, base)
    return f"{d:+.3f} ± {se:.3f}"


def write_results(out: Path, rows: list[dict], keys: list[str]) -> None:
    keys = [flag_of(TrainConfig, k) for k in keys]
    cols = [
        "name",
        *keys,
        "nll_bound",
        "nll_bound_se",
        "ppl_bound",
        "masked_token_accuracy",
        "eval_rows",
        "steps",
        "train_loss",
        "train_mdm",
        "train_kd",
        "tokens_per_s",
        "wall_s",
    ]
    with open(out / "sweep.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    best = min(rows, key=lambda r: r["nll_bound"])
    lines = [
        f"| {' | '.join(keys)} | held-out nll_bound (nats/token) | Δ vs best (paired s.e.) | masked acc. | "
        "train kd | tokens/s | wall s |",
        "|" + " --- |" * (len(keys) + 6),
    ]
    for r in sorted(rows, key=lambda r: r["nll_bound"]):
        kd = f"{r['train_kd']:.3f}" if r.get("train_kd") is not None else "-"
        mark = " **best**" if r is best else ""
        lines.append(
            f"| {' | '.join(str(r[k]) for k in keys)} | {r['nll_bound']:.3f} ± {r['nll_bound_se']:.3f}{mark} | "
            f"{paired_delta(r, best)} | {r['masked_token_accuracy']:.3f} | {kd} | {r.get('tokens_per_s') or 0:.0f} | "
            f"{r['wall_s']} |"
        )
    lines.append("")
    lines.append(
        f"Held-out rows: {best['eval_rows']}; ± is the standard error over rows. Every run is evaluated on the "
        "same rows with the same masks, so a difference is paired: its standard error (Δ column) is far "
        "smaller than the runs' own. Seeds (init, data order) vary more than that: compare across seeds."
    )
    (out / "sweep.md").write_text("\n".join(lines) + "\n")
    from ar2mdm.train.plot import plot_runs

    plot_runs([out / r["name"] for r in rows], out / "sweep.png", key="mdm")
