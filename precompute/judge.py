"""`kdtargets score`: samples judged as the field judges them (MDLM, SEDD, ReMDM, Duo).

A judge is an AR model that reads each sample's text after its prompt: the negative log-likelihood of the
completion's tokens given the prompt, per judge token (whose exponential is the generative perplexity) and per
UTF-8 byte in bits (bits per byte compare across tokenizers). Beside it, what the judge cannot see: the unigram
entropy of each sample's own tokens (low entropy is repetition, which flatters the perplexity), distinct-n, and
the shares of samples that ended early or are mostly one token, and the tokens the sampler drew per forward of the
model (where the file counts forwards). Every figure is per sample, then over a file with its standard error
(samples are the independent units).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from ar2mdm.schemas.samples import SampleRecord
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.stats import mean_se, ratio_se

DISTINCT_N = (1, 2, 3)
MOSTLY_ONE = 0.5  # a sample is "mostly one token" when its most frequent token is more than this share of it


def unigram_entropy(ids: list[int]) -> float:
    """Entropy (nats) of the empirical distribution of a sample's tokens; 0 for a sample of one repeated token."""
    n = len(ids)
    if n == 0:
        return float("nan")
    c = np.fromiter(Counter(ids).values(), np.float64) / n
    return float(-(c * np.log(c)).sum())


def distinct(ids: list[int], n: int) -> float:
    """Distinct n-grams over all n-grams of a sample (NaN where it has none)."""
    grams = [tuple(ids[j : j + n]) for j in range(len(ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else float("nan")


def top_share(ids: list[int]) -> float:
    """The share of a sample's tokens taken by its most frequent one."""
    return max(Counter(ids).values()) / len(ids) if ids else float("nan")


@dataclass
class TextStats:
    """What a sample's own tokens say, whatever the judge."""

    tokens: int
    entropy: float
    distinct: dict[int, float]
    top_share: float
    stopped: bool
    empty: bool
    forwards: int | None  # the forwards that drew it (None: held-out text)

    @classmethod
    def of(cls, r: SampleRecord) -> "TextStats":
        return cls(
            tokens=len(r.ids),
            entropy=unigram_entropy(r.ids),
            distinct={n: distinct(r.ids, n) for n in DISTINCT_N},
            top_share=top_share(r.ids),
            stopped=r.stopped,
            empty=not r.ids or not r.text,
            forwards=r.forwards,
        )


@dataclass
class JudgeScore:
    """One sample under one judge."""

    nll: float  # nats, summed over the completion's judge tokens
    tokens: int  # the completion's judge tokens
    bytes: int  # the completion's UTF-8 bytes


@dataclass
class Judge:
    """An AR model and its tokenizer; ``name`` as the user gave it."""

    name: str
    model: object
    tokenizer: object
    path: str
    weights_sha256: str = ""
    device: str = "cpu"

    @classmethod
    def load(cls, spec: str, device: str = "auto", dtype: str = "auto") -> "Judge":
        from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher

        folder, sha = resolve_teacher(None if spec == "default" else spec)
        t = TorchTeacher.load(folder, device, dtype)
        return cls(
            name=spec,
            model=t.model,
            tokenizer=load_tokenizer(folder),
            path=str(folder),
            weights_sha256=sha,
            device=t.device,
        )


def judge_rows(judge: Judge, records: list[SampleRecord]) -> list[tuple[list[int], int]]:
    """Per record, the judge's ids (BOS + prompt + completion, each text tokenised by the judge) and where the
    completion starts."""
    from ar2mdm.shared.tokenizer import text_row

    out = []
    for r in records:
        head = text_row(judge.tokenizer, r.prompt)
        out.append((head + judge.tokenizer(r.text, add_special_tokens=False)["input_ids"], len(head)))
    return out


@torch.no_grad()
def judge_nll(judge: Judge, records: list[SampleRecord], batch_size: int) -> list[JudgeScore]:
    """Each record's completion under the judge: Σ -log p_J(token | BOS, prompt, earlier tokens), with its judge
    tokens and bytes. Rows are right-padded: under causal attention padding after a row changes nothing before it."""
    from ar2mdm.precompute.forward import check_finite, hidden_states, token_logliks

    rows = judge_rows(judge, records)
    scores: list[JudgeScore | None] = [None] * len(rows)
    order = sorted(range(len(rows)), key=lambda j: len(rows[j][0]))  # similar lengths together: little padding
    for a in range(0, len(order), batch_size):
        batch = order[a : a + batch_size]
        S = max(len(rows[j][0]) for j in batch)
        x = torch.zeros(len(batch), S, dtype=torch.long)
        for b, j in enumerate(batch):
            x[b, : len(rows[j][0])] = torch.tensor(rows[j][0])
        h = hidden_states(judge.model, x.to(judge.device))  # (B, S, H)
        sel_b, sel_p, tgt = [], [], []
        for b, j in enumerate(batch):
            ids, start = rows[j]
            sel_b += [b] * (len(ids) - start)
            sel_p += list(range(start - 1, len(ids) - 1))  # the hidden state before a token predicts it
            tgt += ids[start:]
        ll = token_logliks(judge.model, h[sel_b, sel_p], torch.tensor(tgt, device=h.device)).double().cpu()
        check_finite(ll, "judge log-likelihoods")
        at = 0
        for b, j in enumerate(batch):
            n = len(rows[j][0]) - rows[j][1]
            scores[j] = JudgeScore(float(-ll[at : at + n].sum()), n, len(records[j].text.encode("utf-8")))
            at += n
    return scores


def summary(stats: list[TextStats], scores: list[JudgeScore] | None) -> dict:
    """A file's figures, each with its standard error over samples. The judge's are ratios of sums over the
    non-empty samples (nats per token, bits per byte); the text's are means over samples."""
    keep = [j for j, s in enumerate(stats) if not s.empty]
    out = {"samples": len(stats), "empty": len(stats) - len(keep)}
    if scores is not None and keep:
        nll = np.array([scores[j].nll for j in keep])
        tok = np.array([scores[j].tokens for j in keep])
        byt = np.array([scores[j].bytes for j in keep])
        per_token = nll.sum() / tok.sum()
        out.update(
            nll_per_token=float(per_token),
            nll_per_token_se=ratio_se(nll, tok),
            gen_ppl=float(math.exp(min(per_token, 50))),
            bits_per_byte=float(nll.sum() / math.log(2) / byt.sum()),
            bits_per_byte_se=ratio_se(nll / math.log(2), byt),
            judge_tokens=int(tok.sum()),
            bytes=int(byt.sum()),
        )
    out["entropy"], out["entropy_se"] = mean_se([stats[j].entropy for j in keep])
    for n in DISTINCT_N:
        vals = [stats[j].distinct[n] for j in keep if not math.isnan(stats[j].distinct[n])]
        out[f"distinct_{n}"] = mean_se(vals)[0]
    out["ended_early"] = float(np.mean([s.stopped for s in stats]))
    out["mostly_one_token"] = float(np.mean([s.top_share > MOSTLY_ONE for s in stats if not s.empty] or [0.0]))
    out["tokens_per_sample"] = float(np.mean([s.tokens for s in stats]))
    if all(s.forwards for s in stats):  # the tokens (the stop included: it was drawn) over every forward that drew them
        tok = [s.tokens + s.stopped for s in stats]
        fwd = [s.forwards for s in stats]
        out["tokens_per_forward"], out["tokens_per_forward_se"] = sum(tok) / sum(fwd), ratio_se(tok, fwd)
    return out


@dataclass
class FileScores:
    path: str
    source: dict
    text: dict  # the text's figures (`summary` without a judge)
    judges: dict[str, dict] = field(default_factory=dict)  # judge name -> `summary`
    per_sample: list[dict] = field(default_factory=list)


def score_file(path: str, records: list[SampleRecord], judges: list[Judge], batch_size: int) -> FileScores:
    """A samples file under every judge: its figures and each sample's."""
    stats = [TextStats.of(r) for r in records]
    empty = sum(s.empty for s in stats)
    if empty:
        warn(f"{path}: {empty} of {len(stats)} samples are empty; counted, left out of the judges' and text figures")
    keep = [r for r, s in zip(records, stats) if not s.empty]
    fs = FileScores(path, asdict(records[0].source), summary(stats, None))
    per = [{"index": r.index, **asdict(s)} for r, s in zip(records, stats)]
    for judge in judges:
        got = iter(judge_nll(judge, keep, batch_size))
        scores = [None if s.empty else next(got) for s in stats]
        fs.judges[judge.name] = summary(stats, scores)
        for p, sc in zip(per, scores):
            p[judge.name] = asdict(sc) if sc else None
    fs.per_sample = per
    return fs


def check_tokenizers(files: dict[str, list[SampleRecord]]) -> None:
    """Refuse to judge side by side files whose ids come from different tokenizers (their entropies and
    distinct-n would count different units)."""
    first, recs = next(iter(files.items()))
    want = recs[0].source.tokenizer_sha256
    for path, recs in files.items():
        if recs[0].source.tokenizer_sha256 != want:
            raise UserError(
                f"{path}: samples from another tokenizer than {first}'s ({recs[0].source.tokenizer_sha256[:12]} "
                f"against {want[:12]}); score them apart"
            )


def table(scored: list[FileScores]) -> str:
    """The files' figures as text: one line per file and judge."""
    cols = ("samples", "judge", "bits/byte", "gen ppl", "entropy", "dist-2", "early", "1-tok", "tok/fwd")
    widths = (36, 10, 15, 8, 13, 6, 5, 5, 7)
    lines = [" ".join(f"{c:<{w}}" if i < 2 else f"{c:>{w}}" for i, (c, w) in enumerate(zip(cols, widths)))]
    for f in scored:
        t = f.text
        for name, j in f.judges.items():
            bpb = f"{j['bits_per_byte']:.3f} ± {j['bits_per_byte_se']:.3f}" if "bits_per_byte" in j else "-"
            ppl = f"{j['gen_ppl']:.1f}" if "gen_ppl" in j else "-"
            lines.append(
                f"{Path(f.path).name[-36:]:<36} {name[-10:]:<10} {bpb:>15} {ppl:>8} "
                f"{t['entropy']:.2f} ± {t['entropy_se']:.2f} {t['distinct_2']:>6.2f} {t['ended_early']:>5.2f} "
                f"{t['mostly_one_token']:>5.2f} {t.get('tokens_per_forward', float('nan')):>7.2f}"
            )
    return "\n".join(lines)
