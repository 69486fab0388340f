"""What kdtrain says: damaged shards are named before anything starts, a run says what it will do, every
option has help, and sampling shows what the student wrote."""

import json
import shutil

import pytest
import typer.main
from typer.testing import CliRunner

from ar2mdm.train.cli import app
from ar2mdm.train.config import TrainConfig
from ar2mdm.train.loop import run_training

runner = CliRunner()


def test_a_truncated_shard_is_named_in_one_line_before_anything_starts(tiny_shards, tmp_path):
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    m = json.loads((shards / "manifest.json").read_text())
    bad = shards / m["shards"][1]["file"]
    bad.write_bytes(bad.read_bytes()[: bad.stat().st_size // 2])
    run = tmp_path / "run"
    r = runner.invoke(
        app, ["run", str(shards), "--out", str(run), "--student", "tiny", "--steps", "2", "--no-progress"]
    )
    assert r.exit_code == 2 and "Traceback" not in r.output
    assert bad.name in r.output and "truncated" in r.output and "kdtargets validate" in r.output
    assert not run.exists()  # no run folder with an empty metrics.jsonl left behind
    ok = tmp_path / "ok"
    run_training(TrainConfig(shards=str(tiny_shards), out=str(ok), student="tiny", steps=1, progress=False))
    r = runner.invoke(app, ["eval", str(ok), "--data", str(shards), "--mask-draws", "1"])
    assert r.exit_code == 2 and bad.name in r.output and "Traceback" not in r.output


@pytest.mark.parametrize("workers", [0, 1])
def test_a_shard_damaged_in_place_stops_the_run_in_one_line(tiny_shards, tmp_path, workers):
    """Same size, other bytes: the start-up checks (size, footer) pass, and the damage shows only as its pages
    are read, mid-run, possibly in a DataLoader worker."""
    shards = tmp_path / "shards"
    shutil.copytree(tiny_shards, shards)
    for s in json.loads((shards / "manifest.json").read_text())["shards"]:
        f = shards / s["file"]
        data = bytearray(f.read_bytes())
        pages_end = len(data) - 8 - int.from_bytes(data[-8:-4], "little")  # where the footer starts
        data[4:pages_end] = bytes(pages_end - 4)  # zeros over every page; the footer is intact
        f.write_bytes(bytes(data))
    run = tmp_path / "run"
    r = runner.invoke(
        app,
        [
            "run",
            str(shards),
            "--out",
            str(run),
            "--student",
            "tiny",
            "--steps",
            "2",
            "--no-progress",
            "--num-workers",
            str(workers),
        ],
    )
    assert r.exit_code == 2 and "Traceback" not in r.output, r.output
    line = r.output.strip().splitlines()[-1]
    assert line.startswith("error: step 1: ") and "damaged" in line and "kdtargets validate" in line
    assert "no checkpoint was written yet" in line


def test_a_run_says_rows_steps_and_epochs_before_it_starts(tiny_shards, tmp_path):
    r = runner.invoke(
        app,
        [
            "run",
            str(tiny_shards),
            "--out",
            str(tmp_path / "a"),
            "--student",
            "tiny",
            "--batch-size",
            "4",
            "--steps",
            "3",
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    rows = sum(s["rows"] for s in json.loads((tiny_shards / "manifest.json").read_text())["shards"])
    assert (
        f"kdtrain: {rows} rows per rank x 1 rank(s); 3 steps x 4 rows per step and rank = 12 rows per rank = "
        f"{12 / rows:.2f} epochs"
    ) in r.output
    r = runner.invoke(
        app,
        [
            "run",
            str(tiny_shards),
            "--out",
            str(tmp_path / "e"),
            "--student",
            "tiny",
            "--batch-size",
            "16",
            "--epochs",
            "2",
            "--no-progress",
        ],
    )
    n = 2 * (rows // 16)  # whole steps: rows, steps and epochs add up
    assert (
        f"kdtrain: {rows} rows per rank x 1 rank(s); {n} steps (--epochs 2 x {rows // 16} whole steps per epoch) x "
        f"16 rows per step and rank = {n * 16} rows per rank = {n * 16 / rows:.2f} epochs"
    ) in r.output
    r = runner.invoke(
        app,
        [
            "run",
            str(tiny_shards),
            "--out",
            str(tmp_path / "b"),
            "--student",
            "tiny",
            "--batch-size",
            str(rows + 5),
            "--no-progress",
        ],
    )
    assert r.exit_code == 0, r.output
    assert f"fewer rows per rank ({rows}) than one step takes ({rows + 5})" in r.output


def test_every_kdtrain_option_has_help_and_devices_default_to_auto():
    cmd = typer.main.get_command(app)
    for name, sub in cmd.commands.items():
        for p in sub.params:
            assert getattr(p, "help", None), f"kdtrain {name} {p.name} has no help text"
            if p.name == "device":
                assert p.default == "auto", f"kdtrain {name} --device defaults to {p.default}"
    assert "dtype" in [p.name for p in cmd.commands["run"].params]


def test_sample_shows_prompt_and_completion_and_fill_shows_predictions(tiny_shards, tmp_path):
    run = tmp_path / "s"
    run_training(TrainConfig(shards=str(tiny_shards), out=str(run), student="tiny", steps=2, progress=False))
    r = runner.invoke(app, ["sample", str(run), "--prompt", "fair is", "--length", "6", "--steps", "3"])
    assert r.exit_code == 0, r.output
    lines = r.output.strip("\n").splitlines()
    assert lines[0] == "prompt:     fair is" and lines[1].startswith("completion: ") and len(lines) == 2
    outs = set()
    for seed in (0, 1, 2):
        r = runner.invoke(
            app,
            [
                "sample",
                str(run),
                "--prompt",
                "fair is",
                "--length",
                "6",
                "--steps",
                "3",
                "--temperature",
                "1.0",
                "--remasking",
                "random",
                "--seed",
                str(seed),
            ],
        )
        assert r.exit_code == 0, r.output
        outs.add(r.output)
    assert len(outs) > 1  # the seed matters when sampling
    r = runner.invoke(app, ["fill", str(run), "--text", "fair is [MASK] and foul is [MASK]", "--top", "3"])
    assert r.exit_code == 0, r.output
    assert [ln.split(":")[0] for ln in r.output.splitlines()[1:]] == ["[MASK] 1", "[MASK] 2"]
    r = runner.invoke(app, ["fill", str(run), "--text", "no mask here"])
    assert r.exit_code == 2 and "[MASK]" in r.output
