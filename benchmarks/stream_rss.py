"""Peak RSS of the build's corpus pipeline at 1x and 10x the default corpus, same run.

"stream" is what `kdtargets build` runs: documents read, tokenized (the default teacher's tokenizer) and packed
into L-token rows one at a time, grouped into shards of --seqs-per-shard sequences, each shard dropped before the
next. "hold" is the plan the build used before: every row of the rank in memory before the first shard. Each
measurement is a fresh subprocess (ru_maxrss).

    python -m benchmarks.stream_rss [--scales 1,10] [--seq-len 128] [--seqs-per-shard 64]

The corpus copies are written under a temporary folder and removed at the end.
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(way: str, corpus: str, seq_len: int, per_shard: int) -> None:
    from ar2mdm.precompute.config import BuildConfig
    from ar2mdm.precompute.plan import rank_stream, shard_chunks
    from ar2mdm.precompute.teacher import load_tokenizer, resolve_teacher
    from ar2mdm.shared.corpus import CorpusStats, list_corpus_files
    from ar2mdm.shared.tokenizer import PackStats
    from benchmarks.common import rank_sequences

    tok = load_tokenizer(resolve_teacher(None)[0])
    cfg = BuildConfig(corpus=corpus, seq_len=seq_len, seqs_per_shard=per_shard)
    files = list_corpus_files(corpus)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.perf_counter()
    if way == "stream":
        rows = sum(
            len(ids)
            for _, _, ids, _ in shard_chunks(rank_stream(cfg, files, tok, CorpusStats(), PackStats()), per_shard)
        )
    else:
        rows = len(rank_sequences(cfg, files, tok)[0])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {"rows": rows, "peak_mib": peak / 1024, "growth_mib": (peak - base) / 1024, "s": time.perf_counter() - t0}
        )
    )


def measure(args: list[str], env=None) -> dict:
    out = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=REPO, env=env)
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scales", default="1,10")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--seqs-per-shard", type=int, default=64)
    ap.add_argument("--child", nargs=2, metavar=("WAY", "CORPUS"))
    a = ap.parse_args()
    if a.child:
        return child(a.child[0], a.child[1], a.seq_len, a.seqs_per_shard)

    from ar2mdm.shared.defaults import default_corpus

    src = sorted(default_corpus().glob("*.md"))
    tmp = Path(tempfile.mkdtemp(prefix="stream_rss_"))
    try:
        res = {}
        for scale in [int(s) for s in a.scales.split(",")]:
            d = tmp / f"x{scale}"
            d.mkdir()
            for c in range(scale):
                for f in src:
                    shutil.copyfile(f, d / f"{c:03d}-{f.name}")
            mib = sum(f.stat().st_size for f in d.iterdir()) / 2**20
            for way in ("hold", "stream"):
                res[(scale, way)] = r = measure(
                    [
                        __file__,
                        "--child",
                        way,
                        str(d),
                        "--seq-len",
                        str(a.seq_len),
                        "--seqs-per-shard",
                        str(a.seqs_per_shard),
                    ]
                )
                print(
                    f"{scale:3d}x corpus ({mib:6.1f} MiB, {r['rows']:6d} rows of {a.seq_len}) {way:6s}: peak RSS "
                    f"{r['peak_mib']:7.1f} MiB (+{r['growth_mib']:6.1f} MiB over the start), {r['s']:.1f}s",
                    flush=True,
                )
        scales = sorted({s for s, _ in res})
        if len(scales) > 1:
            lo, hi = scales[0], scales[-1]
            for way in ("hold", "stream"):
                print(
                    f"{way:6s}: RSS growth {res[(lo, way)]['growth_mib']:.1f} -> {res[(hi, way)]['growth_mib']:.1f} "
                    f"MiB "
                    f"({hi // lo}x the corpus)"
                )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
