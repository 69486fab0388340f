"""Sample quality against sampling steps: students' samples judged beside the teacher's own and the held-out text.

    python scripts/quality_curve.py --out curve --prompts-from HELD_OUT \
        --run "LABEL|RUN" [--run "LABEL|RUN" ...]     # runs sharing a LABEL (seeds) are averaged in the plot
        [--steps 4,8,16,32,48] [--num 64] [--prompt-tokens 15] [--length 48] [--judge default --judge gemma]

For every run and step count it draws ``--num`` samples (`kdtrain sample`, prompted by the held-out rows' first
tokens), draws the teacher's own samples and the rows' real continuations under the same prompts (`kdtargets
sample`), scores every file under every judge (`kdtargets score`), and writes OUT/curve.md (the table),
OUT/curve.csv and OUT/curve.png (judge bits per byte and the samples' entropy against steps, the teacher and the
held-out text as anchors). Each stage is a subprocess, so this process never loads a model, and a rerun skips what
is on disk.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import subprocess
import sys
from pathlib import Path


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def draw(a, runs: list[tuple[str, str]], samples: Path) -> dict[str, tuple[str, str, int]]:
    """Every samples file (name -> (label, run, steps)), drawn where missing."""
    prompts = ["--prompts-from", a.prompts_from, "--prompt-tokens", str(a.prompt_tokens), "--num", str(a.num)]
    common = prompts + ["--length", str(a.length), "--seed", str(a.seed), "--device", a.device]
    files = {}
    for kind, label in (("teacher", "teacher"), ("text", "held-out text")):
        out = samples / f"{kind}.jsonl"
        files[out.name] = (label, kind, 0)
        if not out.exists():
            run(["kdtargets", "sample", "--source", kind, *common, "--out", str(out)] + (a.teacher or []))
    for j, (label, path) in enumerate(runs):
        for steps in a.steps:
            out = samples / f"{j:02d}-{slug(label)}-s{steps}.jsonl"
            files[out.name] = (label, path, steps)
            if not out.exists():
                sampler = ["--steps", str(steps), "--temperature", str(a.temperature), "--remasking", a.remasking]
                run(["kdtrain", "sample", path, *common, *sampler, "--out", str(out)])
    return files


def score(a, files: dict, samples: Path, scores: Path) -> list[dict]:
    """Every file's figures under every judge (scored in groups of files, so judges load once per group)."""
    judges = [x for j in a.judge for x in ("--judge", j)]
    todo = [n for n in files if not (scores / f"{n}.json").exists()]
    for g in range(0, len(todo), 8):
        group = todo[g : g + 8]
        tmp = scores / f"group-{g}.json"
        run(
            ["kdtargets", "score", *[str(samples / n) for n in group], *judges, "--out", str(tmp), "--device", a.device]
        )
        for f in json.loads(tmp.read_text())["files"]:
            (scores / f"{Path(f['path']).name}.json").write_text(json.dumps(f))
        tmp.unlink()
    return [json.loads((scores / f"{n}.json").read_text()) for n in files]


def rows_of(files: dict, scored: list[dict], judges: list[str]) -> list[dict]:
    rows = []
    for (label, path, steps), f in zip(files.values(), scored):
        row = {"label": label, "run": path, "steps": steps or ""}
        for j in judges:
            s = f["judges"][j]
            row[f"{j}_bpb"], row[f"{j}_bpb_se"] = s.get("bits_per_byte", math.nan), s.get("bits_per_byte_se", math.nan)
            row[f"{j}_ppl"] = s.get("gen_ppl", math.nan)
        t = f["text"]
        row.update(entropy=t["entropy"], entropy_se=t["entropy_se"], distinct_2=t["distinct_2"])
        row.update(ended_early=t["ended_early"], mostly_one=t["mostly_one_token"], empty=t["empty"])
        rows.append(row)
    return rows


def table(rows: list[dict], judges: list[str]) -> str:
    head = ["samples", "run", "steps", *[f"{j}: bits/byte" for j in judges], "entropy (nats)", "distinct-2"]
    head += ["ended early", "mostly one token"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        cells = [r["label"], r["run"] if r["steps"] else "", str(r["steps"])]
        cells += [f"{r[f'{j}_bpb']:.3f} ± {r[f'{j}_bpb_se']:.3f}" for j in judges]
        cells += [f"{r['entropy']:.3f} ± {r['entropy_se']:.3f}", f"{r['distinct_2']:.3f}"]
        cells += [f"{r['ended_early']:.2f}", f"{r['mostly_one']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], judges: list[str], out: Path) -> None:
    """One panel per judge (bits per byte) and one for entropy, against steps: each label's mean over its runs,
    with the standard error of that mean (from each run's own); the anchors as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(f"{j}_bpb", f"judge {j}: bits per byte") for j in judges] + [("entropy", "entropy of the samples (nats)")]
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4))
    labels = list(dict.fromkeys(r["label"] for r in rows if r["steps"]))
    for ax, (key, title) in zip(axes, keys):
        for n, label in enumerate(labels):
            pts = {}
            for r in rows:
                if r["label"] == label:
                    pts.setdefault(r["steps"], []).append((r[key], r[f"{key}_se"]))
            xs = sorted(pts)
            ys = [sum(v for v, _ in pts[x]) / len(pts[x]) for x in xs]
            es = [math.sqrt(sum(e * e for _, e in pts[x])) / len(pts[x]) for x in xs]
            ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3, label=label, color=f"C{n}")
        for r, style in zip([r for r in rows if not r["steps"]], ("--", ":")):
            ax.axhline(r[key], color="black", linestyle=style, linewidth=1, label=r["label"])
        ax.set_xscale("log", base=2)
        steps = sorted({r["steps"] for r in rows if r["steps"]})
        ax.set_xticks(steps, [str(x) for x in steps])
        ax.minorticks_off()
        ax.set_xlabel("sampling steps")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--run", action="append", required=True, help="LABEL|RUN (runs sharing a label: seeds)")
    ap.add_argument("--prompts-from", required=True, help="a held-out corpus (never trained on)")
    ap.add_argument("--steps", default="4,8,16,32,48", type=lambda s: [int(x) for x in s.split(",")])
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=15)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--remasking", default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", action="append", help="repeatable; default: default (the teacher)")
    ap.add_argument("--teacher", help="the teacher whose samples are the anchor (default: the embedded one)")
    ap.add_argument("--device", default="auto")
    a = ap.parse_args()
    a.judge = a.judge or ["default"]
    a.teacher = ["--teacher", a.teacher] if a.teacher else None
    runs = [tuple(r.split("|", 1)) for r in a.run]
    out = Path(a.out)
    samples, scores = out / "samples", out / "scores"
    samples.mkdir(parents=True, exist_ok=True)
    scores.mkdir(exist_ok=True)
    files = draw(a, runs, samples)
    rows = rows_of(files, score(a, files, samples, scores), a.judge)
    (out / "curve.md").write_text(table(rows, a.judge))
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, a.judge, out / "curve.png")
    print(table(rows, a.judge))
    print(f"{out / 'curve.md'}, {out / 'curve.csv'}, {out / 'curve.png'}")


if __name__ == "__main__":
    main()
