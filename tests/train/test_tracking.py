"""--report-to: the metrics of metrics.jsonl reach TensorBoard and W&B (offline), resumes included."""

import json

import pytest

from ar2mdm.shared.errors import UserError
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.loop import run_training


def cfg(shards, out, **kw):
    return TrainConfig(
        shards=str(shards),
        out=str(out),
        student="tiny",
        batch_size=4,
        steps=4,
        log_every=1,
        save_every=2,
        progress=False,
        **kw,
    )


def jsonl_losses(run):
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_tensorboard_gets_every_logged_metric(tiny_shards, tmp_path):
    pytest.importorskip("tensorboard", reason="the track extra is not installed")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    run_training(cfg(tiny_shards, run, report_to="tensorboard"))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert {"train/loss", "train/kd", "train/mdm", "train/lr", "train/tokens_per_s"} <= set(acc.Tags()["scalars"])
    got = [e.value for e in acc.Scalars("train/loss")]
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert got == pytest.approx(jsonl_losses(run), rel=1e-6)


def test_wandb_offline_run_is_resumed_as_the_same_run(tiny_shards, tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the track extra is not installed")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc key: offline
    monkeypatch.setenv("WANDB_SILENT", "true")
    import wandb

    logged, init = [], wandb.init

    def spy_init(**kw):  # the real W&B run, with its log calls recorded on the way through
        assert kw["mode"] == "offline"
        r = init(**kw)
        log = r.log
        r.log = lambda data, step=None: (logged.append((step, data["train/loss"])), log(data, step=step))[1]
        return r

    monkeypatch.setattr(wandb, "init", spy_init)
    run = tmp_path / "run"
    run_training(cfg(tiny_shards, run, report_to="wandb", stop_at=2))
    run_id = (run / "wandb_id").read_text()
    run_training(cfg(tiny_shards, run, report_to="wandb", resume=True))
    assert (run / "wandb_id").read_text() == run_id
    offline = sorted((run / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(offline) == 2  # the first leg and the resumed one, under one W&B id
    assert all(list(d.glob("*.wandb")) for d in offline)
    assert [st for st, _ in logged] == [1, 2, 3, 4]
    assert [loss for _, loss in logged] == pytest.approx(jsonl_losses(run), rel=1e-6)


def test_report_to_is_checked_before_anything_runs(tiny_shards, tmp_path):
    with pytest.raises(UserError, match="--report-to must be one of none, tensorboard, wandb"):
        run_training(cfg(tiny_shards, tmp_path / "run", report_to="mlflow"))
    assert not (tmp_path / "run").exists()
