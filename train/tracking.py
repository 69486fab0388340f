"""Where a run's metrics go besides ``RUN/metrics.jsonl`` (always written): ``--report-to none|tensorboard|wandb``.

- tensorboard: event files in ``RUN/tb`` (``tensorboard --logdir runs``); needs ``pip install 'ar2mdm[track]'``.
- wandb: one W&B run per kdtrain run folder; a resumed run continues the same W&B run (its id is kept in
  ``RUN/wandb_id``). Online when W&B has an API key (``WANDB_API_KEY`` or ``wandb login``), else offline
  (``RUN/wandb/offline-run-*``, upload later with ``wandb sync``); ``WANDB_MODE`` overrides both. Training
  machines often reach no network, and a tracker must never stop a run from starting.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path

from ar2mdm.shared.errors import UserError
from ar2mdm.train.config import REPORT_TO


@dataclass
class Tracker:
    kind: str
    writer: object  # SummaryWriter or a wandb Run
    where: str  # a line for the user: where the metrics go

    def log(self, metrics: dict, step: int) -> None:
        scalars = {f"train/{k}": float(v) for k, v in metrics.items() if k != "step"}
        if self.kind == "tensorboard":
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
        else:
            self.writer.log(scalars, step=step)

    def close(self) -> None:
        if self.kind == "tensorboard":
            self.writer.close()
        else:
            self.writer.finish()


def _wandb_mode() -> str:
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    import netrc

    try:  # `wandb login` keeps its key in ~/.netrc; asking W&B itself could wait on the network
        has_key = netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        has_key = False
    return "online" if has_key or os.environ.get("WANDB_API_KEY") else "offline"


def open_tracker(report_to: str, run: Path, config: dict) -> Tracker | None:
    """The tracker for ``--report-to`` (None for "none"); a missing package is a one-line UserError."""
    if report_to == "none":
        return None
    if report_to == "tensorboard":
        try:
            from torch.utils.tensorboard import SummaryWriter

            return Tracker(
                "tensorboard", SummaryWriter(str(run / "tb")), f"TensorBoard: tensorboard --logdir {run / 'tb'}"
            )
        except ImportError as e:
            raise UserError(
                f"--report-to tensorboard needs the tensorboard package ({e}); pip install 'ar2mdm[track]'"
            ) from e
    if report_to == "wandb":
        try:
            import wandb
        except ImportError as e:
            raise UserError("--report-to wandb needs the wandb package; pip install 'ar2mdm[track]'") from e
        id_file = run / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        mode = _wandb_mode()
        w = wandb.init(
            project=os.environ.get("WANDB_PROJECT", "ar2mdm"),
            name=run.name,
            id=run_id,
            resume="allow",
            dir=str(run),
            config=config,
            mode=mode,
        )
        where = f"W&B ({mode}): {run / 'wandb'}" + ("; upload with `wandb sync` later" if mode == "offline" else "")
        return Tracker("wandb", w, where)
    raise UserError(f"--report-to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
