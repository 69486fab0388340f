"""`kdtrain eval`: the ELBO bound on held-out data, its standard error, and the KD loss against stored targets;
with ``--by-level``, both by masking level (`ByLevel`)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ar2mdm.schemas.manifest import MANIFEST_NAME
from ar2mdm.shared.blocks import check_block_fit, num_blocks
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.masking import maskable_positions, sample_count_masks, stratified_counts
from ar2mdm.shared.stats import ratio_se
from ar2mdm.student.blocks import block_of
from ar2mdm.train.checkpoint import load_student, run_task, run_tokenizer
from ar2mdm.train.config import EvalConfig, TrainConfig
from ar2mdm.train.data import Row, collate, load_shard_manifest
from ar2mdm.train.device import resolve_device
from ar2mdm.train.losses import corrupt, kd_loss, masked_losses, row_norm


def _sft_rows(data: Path, files: list, tokenizer, meta: dict, *, max_rows: int, messages_field: str) -> list[Row]:
    """Held-out chats rendered exactly as `kdtargets build --task sft` renders them (template, truncation)."""
    from itertools import islice

    from ar2mdm.shared.corpus import CorpusStats, iter_sft_examples
    from ar2mdm.shared.tokenizer import pack_sft

    examples = iter_sft_examples(files, CorpusStats(), messages_field)
    rows = [_row(ids, plen) for ids, plen in islice(pack_sft(examples, tokenizer, meta["seq_len"]), max_rows)]
    if not rows:
        raise UserError(
            f"--data {data}: no chat row (prompt + response, or {messages_field}) fits {meta['seq_len']} tokens"
        )
    return rows


def _row(ids: np.ndarray, prompt_len: int) -> Row:
    """A row without targets (raw held-out text)."""
    return Row(
        example_id="",
        input_ids=ids,
        prompt_len=prompt_len,
        t=1.0,
        mask_positions=np.zeros(0, np.int32),
        target_positions=np.zeros(0, np.int32),
        entry_offsets=np.zeros(1, np.int64),
        target_ids=np.zeros(0, np.int32),
        target_logprobs=np.zeros(0, np.float32),
    )


def _rows_from(
    data: Path,
    meta: dict,
    tokenizer,
    *,
    max_rows: int,
    by_line: bool,
    text_field: str,
    split: str = "test",
    task: str = "pretrain",
    messages_field: str = "messages",
) -> tuple[list[Row], object]:
    """Rows to evaluate: a shard folder's rows (with targets), or a corpus (files or a dataset) packed like the
    precompute (``task`` "sft": chats, rendered like the SFT build)."""
    from ar2mdm.shared.corpus import CorpusStats, is_dataset, iter_documents, list_corpus_files

    if not is_dataset(data) and not data.exists():
        raise UserError(f"--data {data} does not exist")
    if (data / MANIFEST_NAME).exists():
        from itertools import chain, islice

        from ar2mdm.train.data import rows_of_shard

        manifest = load_shard_manifest(data, allow_partial=True)  # its first rows are evaluated, finished or not
        if manifest.tokenizer.sha256 != meta["tokenizer_sha256"]:
            raise UserError(f"--data {data}: shards built with another tokenizer than the student's")
        rows = chain.from_iterable(rows_of_shard(data / s.file) for s in manifest.shards)
        return list(islice(rows, max_rows)), manifest
    from ar2mdm.shared.tokenizer import pack_documents

    files = list_corpus_files(data, split)
    if task == "sft":
        return _sft_rows(data, files, tokenizer, meta, max_rows=max_rows, messages_field=messages_field), None
    rows = []
    docs = iter_documents(files, CorpusStats(), by_line=by_line, text_field=text_field)
    for ids in pack_documents(docs, tokenizer, meta["seq_len"]):
        rows.append(_row(ids, 0))
        if len(rows) >= max_rows:
            break
    if not rows:
        raise UserError(f"--data {data}: no full row of {meta['seq_len']} tokens")
    return rows, None


@dataclass
class ByLevel:
    """Masked-token figures by masking level, in ``buckets`` equal bins of [0, 1]: the level of a masked position
    is the share of its row's (block's) maskable positions that is masked (the bound's masks), or its row's
    (block's) t (a shard's own masks, where the KD term against the stored targets is added)."""

    buckets: int
    sums: dict = field(default_factory=dict)  # name -> (buckets,) float64 sums

    def add(self, level: torch.Tensor, **values: torch.Tensor) -> None:
        """Add per-position values (M,) at their levels (M,)."""
        b = (level.double().cpu() * self.buckets).long().clamp(0, self.buckets - 1)
        for name, v in {"positions": torch.ones_like(b, dtype=torch.float64), **values}.items():
            acc = self.sums.setdefault(name, torch.zeros(self.buckets, dtype=torch.float64))
            acc.index_add_(0, b, v.double().cpu())

    def rows(self) -> list[dict]:
        """Per bucket: its range, masked positions, and each value's mean per position."""
        n = self.sums.get("positions", torch.zeros(self.buckets, dtype=torch.float64))
        out = []
        for j in range(self.buckets):
            r = {"level": f"{j / self.buckets:.2f}-{(j + 1) / self.buckets:.2f}", "positions": int(n[j])}
            r.update({k: float(v[j] / n[j]) if n[j] else None for k, v in self.sums.items() if k != "positions"})
            out.append(r)
        return out


@torch.no_grad()
def elbo_row_estimates(
    model,
    ids: torch.Tensor,
    maskable: torch.Tensor,
    draws: int,
    g: torch.Generator,
    *,
    mask_id: int,
    levels: ByLevel | None = None,
) -> tuple[torch.Tensor, float, float]:
    """(B,) float64 unbiased estimates of each row's ELBO bound on -log p(maskable tokens | the rest), in nats,
    and the masked-token hits and count. ids, maskable: (B, L); masks are drawn on the CPU from ``g``.

    Row b with n maskable positions: (1/draws) Σ_j (n/l_j) Σ_{i masked} -log p_θ(x_i | x_t), l_j stratified. A
    block student's bound is the sum over its blocks of each block's bound given the clean blocks before it
    (docs/design.md §6): each block draws its own l among its own n, all blocks of a row in one forward.
    ``levels``: also each masked token's nll and hit by the share l/n of its row (block) masked.
    """
    B, L = ids.shape
    nb = num_blocks(L, model.config.block_size)
    by_block = maskable.cpu().reshape(B * nb, L // nb)  # (B·nb, block size): one row per (row, block)
    n = by_block.sum(1)  # (B·nb,)
    counts = stratified_counts(n, draws, g)  # (B·nb, draws)
    est = torch.zeros(B, dtype=torch.float64)
    hits = total = 0.0
    for j in range(draws):
        mask = sample_count_masks(by_block, counts[:, j], g).reshape(B, L).to(ids.device)  # (B, L)
        logits = model(corrupt(ids, mask, mask_id), mask, context=ids).float()  # (M, V)
        nll = torch.nn.functional.cross_entropy(logits, ids[mask], reduction="none")  # (M,)
        where = mask.nonzero()  # (M, 2)
        block = where[:, 0] * nb + block_of(where[:, 1], model.config.block_size)  # (M,) each one's (row, block)
        per_block = torch.zeros(B * nb, device=ids.device).index_add(0, block, nll)  # (B·nb,)
        est += (per_block.cpu().double() * n / counts[:, j].clamp(min=1) / draws).view(B, nb).sum(1)
        hit = logits.argmax(-1) == ids[mask]
        hits += float(hit.sum())
        total += float(mask.sum())
        if levels is not None:
            share = (counts[:, j] / n.clamp(min=1)).to(block.device)[block]  # (M,) l/n of each position's block
            levels.add(share, nll=nll, accuracy=hit)
    return est, hits, total


@torch.no_grad()
def kd_term(model, batch, obj, spec, levels: ByLevel | None = None) -> float:
    """The KD term of a batch of shard rows against their stored targets, at the run's own T and tail; with
    ``levels``, each masked position's KL, nll and hit by its row's (block's) t."""
    from ar2mdm.train.objective import batch_targets, position_t

    L = batch.input_ids.shape[1]
    logits = model(corrupt(batch.input_ids, batch.mask, model.config.mask_id), batch.positions, context=batch.input_ids)
    truth = batch.input_ids.flatten()[batch.positions]
    nll, kl = masked_losses(logits, truth, batch_targets(batch, obj, spec))
    row = batch.positions // L
    if levels is not None:
        levels.add(position_t(batch, row, spec.block_size), kl=kl, nll=nll, accuracy=logits.argmax(-1) == truth)
    return float(kd_loss(kl, row, row_norm(batch.prompt_len, L)))


@dataclass
class Held:
    """What `evaluate` scores: the student, its held-out rows and, on shards, their targets and the run's
    objective."""

    model: torch.nn.Module
    device: torch.device
    task: str  # "sft": each response through its end of turn is scored; else every maskable position
    rows: list[Row]
    stops: list[int]  # the tokens that end a response (sft)
    spec: object = None  # the shards' `data.TargetSpec` (None: raw text, no KD term)
    objective: object = None  # the run's `objective.Objective`, at its own T and tail


def setup_eval(cfg: EvalConfig) -> Held:
    """Load the run's student, read the held-out rows as its task renders them, and, on shards, check that their
    targets fit the student."""
    from ar2mdm.shared.tokenizer import stop_ids
    from ar2mdm.train.data import TargetSpec

    cfg.check()
    device = resolve_device(cfg.device)
    model, meta = load_student(Path(cfg.run), device)
    tokenizer = run_tokenizer(Path(cfg.run))
    task = run_task(meta)[0] if cfg.task == "auto" else cfg.task
    rows, manifest = _rows_from(
        Path(cfg.data),
        meta,
        tokenizer,
        max_rows=cfg.max_rows,
        by_line=cfg.by_line,
        text_field=cfg.text_field,
        split=cfg.split,
        task=task,
        messages_field=cfg.messages_field,
    )
    held = Held(model=model, device=device, task=task, rows=rows, stops=stop_ids(tokenizer))
    if manifest is not None:
        held.spec = TargetSpec.from_manifest(manifest)
        check_block_fit(model.config.block_size, held.spec.block_size, f"{cfg.run}")
        held.objective = TrainConfig(**meta["train"]).objective(held.spec)  # the run's own T and tail
    return held


def scored_positions(held: Held, chunk: list[Row], ids: torch.Tensor) -> torch.Tensor:
    """(B, L) bool: the positions a batch's bound covers: the maskable ones, for sft only each response through
    its end of turn, [prompt_len, prompt_len + n)."""
    from ar2mdm.shared.tokenizer import response_length

    plen = torch.tensor([r.prompt_len for r in chunk], device=ids.device)
    maskable = maskable_positions(ids.shape[1], plen)  # (B, L)
    if held.task == "sft":
        n = [r.prompt_len + response_length(r.input_ids, r.prompt_len, held.stops) for r in chunk]
        maskable &= torch.arange(ids.shape[1], device=ids.device)[None, :] < torch.tensor(n, device=ids.device)[:, None]
    return maskable


@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict:
    """Held-out ELBO bound (nats/token) with its standard error, masked-token accuracy and, on shards, the
    KD loss against the stored targets.

    The bound is LLaDA's estimator of the MDLM ELBO, -log p(x) <= E_l [(n/l) Σ_{l masked} -log p_θ(x_i | x_t)]
    with l ~ U{1..n} positions masked uniformly among the n maskable ones: unbiased for the same bound as the
    1/t form, with weights at most n instead of 1/eps, and no forced mask. ``mask_draws`` draws of l per row,
    stratified. Masks depend on ``seed``, the rows and ``batch_size`` only, never on the model: two runs
    evaluated alike see the same masks, and their difference is the models'. ``row_estimates``: also return each
    row's estimate (``row_nll``, nats) and maskable tokens (``row_tokens``), for paired comparisons. ``split``:
    the split of a dataset ``data`` (save_to_disk folder or hf:NAME). Settings: `config.EvalConfig`.

    ``task`` "sft" (``auto``: the run's own task): ``data`` holds chats (``messages``, or ``prompt`` +
    ``response``), rendered as the SFT build renders them, and the bound covers each response's tokens through
    its end of turn, given the prompt: neither the prompt and template tokens nor the EOS padding after the
    response are scored (the padding stays visible, so the bound is given the response's length).
    """
    held = setup_eval(cfg)
    model = held.model
    g = torch.Generator().manual_seed(cfg.seed)
    row_est, row_tok, correct, masked, kd_sum = [], [], 0.0, 0.0, 0.0
    bound_levels = ByLevel(cfg.by_level) if cfg.by_level else None
    target_levels = ByLevel(cfg.by_level) if cfg.by_level and held.spec is not None else None
    for a in range(0, len(held.rows), cfg.batch_size):
        chunk = held.rows[a : a + cfg.batch_size]
        ids = torch.as_tensor(np.stack([r.input_ids for r in chunk]), dtype=torch.long, device=held.device)  # (B, L)
        maskable = scored_positions(held, chunk, ids)
        est, hits, k = elbo_row_estimates(
            model, ids, maskable, cfg.mask_draws, g, mask_id=model.config.mask_id, levels=bound_levels
        )
        correct, masked = correct + hits, masked + k
        row_est.append(est)
        row_tok.append(maskable.sum(1).cpu().double())
        if held.spec is not None:
            batch = collate(chunk, held.spec).to(held.device)
            kd_sum += kd_term(model, batch, held.objective, held.spec, target_levels) * len(chunk)
    est, tok = torch.cat(row_est), torch.cat(row_tok)
    nll_bound = float(est.sum() / tok.sum().clamp(min=1))
    out = {
        "nll_bound": nll_bound,
        "nll_bound_se": ratio_se(est, tok),
        "ppl_bound": math.exp(min(nll_bound, 50)),
        "masked_token_accuracy": correct / max(masked, 1),
        "rows": len(held.rows),
        "tokens": int(tok.sum()),
        "mask_draws": cfg.mask_draws,
        "seed": cfg.seed,
        "task": held.task,
        "uniform_nll": math.log(model.config.vocab_size),
        "block_size": model.config.block_size,  # None: a full-attention student's bound
    }
    if held.spec is not None:
        out["kd_loss"] = kd_sum / len(held.rows)
    if bound_levels is not None:
        out["by_level"] = {"bound": bound_levels.rows()}
        if target_levels is not None:
            out["by_level"]["targets"] = target_levels.rows()
    if cfg.row_estimates:
        out["row_nll"], out["row_tokens"] = est.tolist(), tok.tolist()
    return out
