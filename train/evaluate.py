"""`kdtrain eval` and `kdtrain sample`: the ELBO bound on held-out data, and LLaDA's low-confidence sampler."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ar2mdm.shared.errors import UserError
from ar2mdm.shared.masking import maskable_positions, sample_masks
from ar2mdm.train.checkpoint import load_student, load_tokenizer
from ar2mdm.train.data import Row, collate
from ar2mdm.train.losses import corrupt, kd_loss, row_norm, student_logprobs


def _rows_from(data: Path, meta: dict, tokenizer, max_rows: int) -> tuple[list[Row], object]:
    """Rows to evaluate: a shard folder's rows (with targets), or a text corpus packed like the precompute."""
    if (data / "manifest.json").exists():
        from itertools import chain, islice

        from ar2mdm.train.data import rows_of_shard
        from ar2mdm.train.loop import load_shard_manifest

        manifest = load_shard_manifest(data)
        if manifest.tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise UserError(f"--data {data}: shards built with another tokenizer than the student's")
        rows = chain.from_iterable(rows_of_shard(data / s.file) for s in manifest.shards)
        return list(islice(rows, max_rows)), manifest
    from ar2mdm.shared.corpus import CorpusStats, iter_documents, list_corpus_files
    from ar2mdm.shared.tokenizer import pack_documents

    files = list_corpus_files(data)
    rows = []
    for ids in pack_documents(iter_documents(files, CorpusStats()), tokenizer, meta["seq_len"]):
        rows.append(Row("", ids, 0, 1.0, np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64),
                        np.zeros(0, np.int32), np.zeros(0, np.float32)))  # fmt: skip
        if len(rows) >= max_rows:
            break
    if not rows:
        raise UserError(f"--data {data}: no full row of {meta['seq_len']} tokens")
    return rows, None


@torch.no_grad()
def evaluate(run: str, data: str, seed: int = 0, mc_samples: int = 4, batch_size: int = 16, max_rows: int = 256,
             device: str = "cpu") -> dict:  # fmt: skip
    """ELBO bound (nats/token), masked-token accuracy and, on shards, the KD loss with the stored targets."""
    model, meta = load_student(Path(run), device)
    tokenizer = load_tokenizer(Path(run))
    rows, manifest = _rows_from(Path(data), meta, tokenizer, max_rows)
    mask_id = model.config.mask_id
    g = torch.Generator().manual_seed(seed)
    nll_sum = tok_sum = correct = masked = 0.0
    kd_sum, kd_rows = 0.0, 0
    train = meta["train"]
    for a in range(0, len(rows), batch_size):
        chunk = rows[a : a + batch_size]
        ids = torch.as_tensor(np.stack([r.input_ids for r in chunk]), dtype=torch.long, device=device)  # (B, L)
        plen = torch.tensor([r.prompt_len for r in chunk], device=device)
        maskable = maskable_positions(ids.shape[1], plen)  # (B, L)
        for _ in range(mc_samples):
            # MDLM/LLaDA: -log p(x) <= E_t [ (1/t) sum_{masked} -log p_θ(x_i | x_t) ]
            t, mask = sample_masks(maskable.cpu(), g)
            t, mask = t.to(device), mask.to(device)
            x_t = corrupt(ids, mask, mask_id)
            logits = model(x_t, mask).float()  # (K, V)
            nll = torch.nn.functional.cross_entropy(logits, ids[mask], reduction="none")  # (K,)
            row = mask.nonzero()[:, 0]
            per_row = torch.zeros(len(chunk), device=device).index_add(0, row, nll)  # (B,)
            nll_sum += float((per_row / t).sum()) / mc_samples
            correct += float((logits.argmax(-1) == ids[mask]).sum())
            masked += float(mask.sum())
        tok_sum += float(maskable.sum())
        if manifest is not None:
            top_n = int(manifest.params.get("top_n", 16))
            b = collate(chunk, top_n).to(device)
            logits = model(corrupt(b.input_ids, b.mask, mask_id), b.mask)
            norm = row_norm(b.prompt_len, b.input_ids.shape[1])
            T = train.get("temperature", 1.0)
            kd = kd_loss(student_logprobs(logits, T), b.target_ids, b.target_logprobs, b.mask.nonzero()[:, 0], norm,
                         T, train.get("tail", "renormalize"))  # fmt: skip
            kd_sum += float(kd) * len(chunk)
            kd_rows += len(chunk)
    nll_bound = nll_sum / max(tok_sum, 1)
    out = {"nll_bound": nll_bound, "ppl_bound": math.exp(min(nll_bound, 50)), "masked_token_accuracy": correct / max(masked, 1),
           "rows": len(rows), "tokens": int(tok_sum), "mc_samples": mc_samples, "seed": seed}  # fmt: skip
    if kd_rows:
        out["kd_loss"] = kd_sum / kd_rows
    return out


@torch.no_grad()
def sample(run: str, prompt: str, length: int, steps: int, device: str = "cpu") -> str:
    """LLaDA's sampler: start fully masked, predict all masked tokens each step, keep the most confident ones
    (a linear schedule of how many stay masked) and remask the rest."""
    if length < 1 or steps < 1:
        raise UserError("--length and --steps must be at least 1")
    model, meta = load_student(Path(run), device)
    tok = load_tokenizer(Path(run))
    from ar2mdm.shared.tokenizer import special_ids

    bos, _ = special_ids(tok)
    p = [bos] + tok(prompt, add_special_tokens=False)["input_ids"]
    mask_id = model.config.mask_id
    x = torch.tensor([p + [mask_id] * length], device=device)  # (1, P+N)
    steps = min(steps, length)
    for s in range(steps):
        masked = x == mask_id  # (1, S)
        n_masked = int(masked.sum())
        keep_masked = int(length * (1 - (s + 1) / steps))
        reveal = n_masked - keep_masked
        if reveal <= 0:
            continue
        probs = torch.softmax(model(x, masked).float(), -1)  # (K, V)
        conf, pred = probs.max(-1)  # (K,)
        top = conf.topk(reveal).indices
        pos = masked.nonzero()[:, 1]
        x[0, pos[top]] = pred[top]
    return tok.decode(x[0, len(p) :].tolist(), skip_special_tokens=False)


def plot(run: str, out: str | None = None) -> Path:
    """PNG of the loss curves in RUN/metrics.jsonl."""
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(run) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run}: no metrics.jsonl")
    recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not recs:
        raise UserError(f"{path} is empty")
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in ("loss", "mdm", "kd"):
        pts = [(r["step"], r[key]) for r in recs if key in r]
        if pts:
            ax.plot(*zip(*pts), label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(f"kdtrain {Path(run).name}")
    ax.legend()
    ax.grid(alpha=0.3)
    target = Path(out) if out else Path(run) / "loss.png"
    fig.tight_layout()
    fig.savefig(target, dpi=110)
    return target
