"""`kdtrain plot`: the loss curves of one run, or one term of several runs overlaid (a sweep)."""

from __future__ import annotations

import json
from pathlib import Path

from ar2mdm.shared.errors import UserError


def _metrics(run: Path) -> list[dict]:
    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run}: no metrics.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        raise UserError(f"{path} is empty")
    return recs


def plot_runs(runs: list[Path], out: Path, key: str | None = None) -> Path:
    """PNG of the loss curves in RUN/metrics.jsonl: every term of one run, or one term (``key``, default
    "loss") of several runs overlaid (a sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for run in runs:
        recs = _metrics(run)
        for k in ("loss", "mdm", "kd") if len(runs) == 1 and key is None else (key or "loss",):
            pts = [(r["step"], r[k]) for r in recs if k in r]
            if pts:
                ax.plot(*zip(*pts), label=k if len(runs) == 1 else f"{Path(run).name} {k}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"kdtrain {Path(runs[0]).name}" if len(runs) == 1 else f"kdtrain: {len(runs)} runs")
    ax.legend(fontsize=7 if len(runs) > 4 else 9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot(runs: list[str], out: str | None = None) -> Path:
    """RUN/loss.png for one run; with several, one overlay of their losses (``out`` default: ./runs.png)."""
    if not runs:
        raise UserError("give at least one run folder")
    target = Path(out) if out else (Path(runs[0]) / "loss.png" if len(runs) == 1 else Path("runs.png"))
    return plot_runs([Path(r) for r in runs], target)
