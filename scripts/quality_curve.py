"""Sample quality against parallelism: students' samples judged beside the teacher's own and the held-out text.

    python scripts/quality_curve.py --out curve --prompts-from HELD_OUT \
        --run "LABEL|RUN" [--run "LABEL|RUN" ...]     # runs sharing a LABEL (seeds) are averaged in the plot
        [--steps 4,8,16,32,48] [--thresholds 1,0.9,0.7,0.5] [--temperatures 1] [--num 64] [--prompt-tokens 15]
        [--length 48] [--judge default --judge gemma]

For every run it draws ``--num`` samples (`kdtrain sample`, prompted by the held-out rows' first tokens) at each
sampler setting: a full-attention student at each of ``--steps``, a block student at each threshold τ of
``--thresholds``, both at each of ``--temperatures``. It draws the teacher's own samples (at each temperature) and
the rows' real continuations under the same prompts (`kdtargets sample`), scores every file under every judge
(`kdtargets score`), and writes OUT/curve.md (the table), OUT/curve.csv and OUT/curve.png: judge bits per byte
and the samples' entropy against the tokens each sampler drew per forward of its model (every forward counted;
the teacher's own decoding is the point at 1), the held-out text as a line; with several temperatures, also bits
per byte against entropy (arms compared at matched entropy). With ``--paired LABEL``, also OUT/paired.md: each
other label's bits per byte minus LABEL's, paired sample by sample over the same prompts (a label's i-th run
against LABEL's i-th: seeds in the same order), mean ± s.e. over the pairs, per sampler setting and temperature,
and, with several temperatures, each label read at LABEL's entropy (`matched`). Each stage is a subprocess, so
this process never loads a model, and a rerun skips what is on disk.
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

from ar2mdm.shared.stats import mean_se


def run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    subprocess.run(cmd, check=True)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", text).strip("-")


def block_size(run_dir: str) -> int | None:
    """A run's block size, from its checkpoint's config (None: a full-attention student)."""
    for d in ("checkpoint", "checkpoint.old"):
        f = Path(run_dir) / d / "config.json"
        if f.exists():
            return json.loads(f.read_text())["student"].get("block_size")
    raise SystemExit(f"{run_dir}: no checkpoint")


def fmt(x: float) -> str:
    return f"{x:g}"


def draw(a, runs: list[tuple[str, str]], samples: Path) -> dict[str, dict]:
    """Every samples file (name -> what drew it: label, run, setting, temperature), drawn where missing."""
    prompts = ["--prompts-from", a.prompts_from, "--prompt-tokens", str(a.prompt_tokens), "--num", str(a.num)]
    common = prompts + ["--length", str(a.length), "--seed", str(a.seed), "--device", a.device]
    files = {}
    out = samples / "text.jsonl"
    files[out.name] = dict(label="held-out text", run="text", setting="", temperature="")
    if not out.exists():
        run(["kdtargets", "sample", "--source", "text", *common, "--out", str(out)])
    for T in a.temperatures:
        out = samples / f"teacher-T{fmt(T)}.jsonl"
        files[out.name] = dict(label="teacher", run="teacher", setting="AR", temperature=T)
        if not out.exists():
            teacher = ["--temperature", str(T)] + (a.teacher or [])
            run(["kdtargets", "sample", "--source", "teacher", *common, *teacher, "--out", str(out)])
    for j, (label, path) in enumerate(runs):
        blocks = block_size(path) is not None
        for setting in a.thresholds if blocks else a.steps:
            for T in a.temperatures:
                name = f"tau{fmt(setting)}" if blocks else f"s{setting}"
                out = samples / f"{j:02d}-{slug(label)}-{name}-T{fmt(T)}.jsonl"
                files[out.name] = dict(label=label, run=path, setting=name.replace("tau", "τ="), temperature=T)
                if not out.exists():
                    sampler = ["--threshold", str(setting)] if blocks else ["--steps", str(setting)]
                    sampler += ["--temperature", str(T)] + ([] if blocks else ["--remasking", a.remasking])
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
    for what, f in zip(files.values(), scored):
        row = dict(what)
        for j in judges:
            s = f["judges"][j]
            row[f"{j}_bpb"], row[f"{j}_bpb_se"] = s.get("bits_per_byte", math.nan), s.get("bits_per_byte_se", math.nan)
            row[f"{j}_ppl"] = s.get("gen_ppl", math.nan)
        t = f["text"]
        row.update(entropy=t["entropy"], entropy_se=t["entropy_se"], distinct_2=t["distinct_2"])
        row.update(ended_early=t["ended_early"], mostly_one=t["mostly_one_token"], empty=t["empty"])
        row.update(tokens_per_forward=t.get("tokens_per_forward", math.nan))
        row.update(tokens_per_forward_se=t.get("tokens_per_forward_se", math.nan))
        rows.append(row)
    return rows


def table(rows: list[dict], judges: list[str]) -> str:
    head = ["samples", "run", "sampler", "T", "tokens/forward", *[f"{j}: bits/byte" for j in judges]]
    head += ["entropy (nats)", "distinct-2", "ended early", "mostly one token"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        tpf = "" if math.isnan(r["tokens_per_forward"]) else f"{r['tokens_per_forward']:.2f}"
        cells = [r["label"], r["run"] if r["setting"] not in ("", "AR") else "", str(r["setting"])]
        cells += [str(r["temperature"]), tpf]
        cells += [f"{r[f'{j}_bpb']:.3f} ± {r[f'{j}_bpb_se']:.3f}" for j in judges]
        cells += [f"{r['entropy']:.3f} ± {r['entropy_se']:.3f}", f"{r['distinct_2']:.3f}"]
        cells += [f"{r['ended_early']:.2f}", f"{r['mostly_one']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sample_bpb(scores: dict, judge: str) -> dict[int, float]:
    """A scored file's bits per byte per sample index, under one judge (empty samples left out)."""
    out = {}
    for p in scores["per_sample"]:
        s = p.get(judge)
        if s and s["bytes"]:
            out[p["index"]] = s["nll"] / math.log(2) / s["bytes"]
    return out


def paired(files: dict, scored: list[dict], base: str, judges: list[str]) -> list[dict]:
    """Each label's bits per byte minus ``base``'s at the same sampler setting and temperature, paired sample by
    sample (same prompt, same seed; a label's i-th run against base's i-th): {label, setting, temperature, judge,
    delta, se, pairs}."""
    runs: dict = {}  # (label, setting, T) -> scores of its runs, in the order given
    for what, f in zip(files.values(), scored):
        runs.setdefault((what["label"], what["setting"], what["temperature"]), []).append(f)
    out = []
    for (label, setting, T), mine in runs.items():
        theirs = runs.get((base, setting, T))
        if label == base or theirs is None:
            continue
        for j in judges:
            d = []
            for a, b in zip(mine, theirs):
                x, y = sample_bpb(a, j), sample_bpb(b, j)
                d += [x[i] - y[i] for i in x if i in y]
            mean, se = mean_se(d)
            out.append(dict(label=label, setting=setting, temperature=T, judge=j, delta=mean, se=se, pairs=len(d)))
    return out


def matched(rows: list[dict], label: str, judge: str, entropy: float) -> float:
    """``label``'s bits per byte at ``entropy``, on the line through its two extreme temperatures' (mean of its
    runs at each; one setting per label)."""
    pts = mean_points(rows, label, "entropy", f"{judge}_bpb")
    (h1, b1, _), (h2, b2, _) = pts[0], pts[-1]
    return b1 + (b2 - b1) * (entropy - h1) / (h2 - h1)


def paired_table(pairs: list[dict], rows: list[dict], base: str, judges: list[str], temperatures: list) -> str:
    lines = [f"Paired against {base} (Δ bits/byte, mean ± s.e. over pairs of samples):", ""]
    lines += ["| samples | sampler | T | judge | Δ bits/byte | pairs |", "| --- | --- | --- | --- | --- | --- |"]
    for p in pairs:
        cells = [p["label"], str(p["setting"]), str(p["temperature"]), p["judge"]]
        lines.append("| " + " | ".join(cells + [f"{p['delta']:+.3f} ± {p['se']:.3f}", str(p["pairs"])]) + " |")
    labels = list(dict.fromkeys(p["label"] for p in pairs))
    if len(temperatures) > 1 and labels and len({r["setting"] for r in rows if r["label"] == base}) == 1:
        h = [r["entropy"] for r in rows if r["label"] == base and r["temperature"] == max(temperatures)]
        h = sum(h) / len(h)
        lines += ["", f"At matched entropy ({base}'s at T = {fmt(max(temperatures))}, {h:.3f} nats): Δ bits/byte", ""]
        for label in labels:
            d = [f"{j} {matched(rows, label, j, h) - matched(rows, base, j, h):+.3f}" for j in judges]
            lines.append(f"- {label}: " + ", ".join(d))
    return "\n".join(lines) + "\n"


def mean_points(rows: list[dict], label: str, x: str, y: str) -> list[tuple[float, float, float]]:
    """(x, y, s.e.) per sampler setting and temperature of one label: the mean over its runs (seeds), the error
    of that mean from each run's own, sorted by x."""
    pts: dict = {}
    for r in rows:
        if r["label"] == label:
            pts.setdefault((r["setting"], r["temperature"]), []).append((r[x], r[y], r.get(f"{y}_se", 0.0)))
    out = []
    for v in pts.values():
        n = len(v)
        out.append((sum(a for a, _, _ in v) / n, sum(b for _, b, _ in v) / n, math.sqrt(sum(e * e for *_, e in v)) / n))
    return sorted(out)


def plot(rows: list[dict], judges: list[str], out: Path, temperatures: list[float]) -> None:
    """One panel per judge (bits per byte) and one for entropy against tokens per forward (one line per label,
    the held-out text a horizontal line), and with several temperatures, bits per byte against entropy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [(f"{j}_bpb", f"judge {j}: bits per byte") for j in judges] + [("entropy", "entropy of the samples (nats)")]
    panels = [("tokens_per_forward", k, t) for k, t in keys]
    if len(temperatures) > 1:
        panels += [("entropy", f"{j}_bpb", f"judge {j}: bits per byte at matched entropy") for j in judges]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    labels = list(dict.fromkeys(r["label"] for r in rows if r["run"] != "text"))
    text = next(r for r in rows if r["run"] == "text")
    for ax, (x, key, title) in zip(axes, panels):
        for n, label in enumerate(labels):
            pts = mean_points(rows, label, x, key)
            style = dict(marker="*", markersize=12, linestyle="none") if label == "teacher" else dict(marker="o")
            ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], capsize=3, label=label,
                        color=f"C{n}", **style)  # fmt: skip
        if x == "tokens_per_forward":
            ax.axhline(text[key], color="black", linestyle=":", linewidth=1, label=text["label"])
            ax.set_xlabel("tokens per forward (every forward counted)")
        else:
            ax.plot([text["entropy"]], [text[key]], "kx", markersize=9, label=text["label"])
            ax.set_xlabel("entropy of the samples (nats)")
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
    ap.add_argument("--thresholds", default="1,0.9,0.7,0.5", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--temperatures", default="1", type=lambda s: [float(x) for x in s.split(",")])
    ap.add_argument("--num", type=int, default=64)
    ap.add_argument("--prompt-tokens", type=int, default=15)
    ap.add_argument("--length", type=int, default=48)
    ap.add_argument("--remasking", default="random")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--judge", action="append", help="repeatable; default: default (the teacher)")
    ap.add_argument("--teacher", help="the teacher whose samples are the anchor (default: the embedded one)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--paired", help="a LABEL: every other label's bits per byte paired against its (paired.md)")
    a = ap.parse_args()
    a.judge = a.judge or ["default"]
    a.teacher = ["--teacher", a.teacher] if a.teacher else None
    runs = [tuple(r.split("|", 1)) for r in a.run]
    if a.paired and a.paired not in {label for label, _ in runs}:
        raise SystemExit(f"--paired {a.paired!r}: not the label of any --run")
    out = Path(a.out)
    samples, scores = out / "samples", out / "scores"
    samples.mkdir(parents=True, exist_ok=True)
    scores.mkdir(exist_ok=True)
    files = draw(a, runs, samples)
    scored = score(a, files, samples, scores)
    rows = rows_of(files, scored, a.judge)
    (out / "curve.md").write_text(table(rows, a.judge))
    with open(out / "curve.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    plot(rows, a.judge, out / "curve.png", a.temperatures)
    print(table(rows, a.judge))
    if a.paired:
        text = paired_table(paired(files, scored, a.paired, a.judge), rows, a.paired, a.judge, a.temperatures)
        (out / "paired.md").write_text(text)
        print(text)
    print(f"{out / 'curve.md'}, {out / 'curve.csv'}, {out / 'curve.png'}")


if __name__ == "__main__":
    main()
