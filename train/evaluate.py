"""`kdtrain eval` and `kdtrain sample`: the ELBO bound on held-out data, and LLaDA's low-confidence sampler."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ar2mdm.shared.errors import UserError
from ar2mdm.shared.masking import maskable_positions, sample_count_masks, stratified_counts
from ar2mdm.train.checkpoint import load_student, load_tokenizer, run_task
from ar2mdm.train.config import EvalConfig, FillConfig, SampleConfig, TrainConfig
from ar2mdm.train.data import Row, collate, load_shard_manifest
from ar2mdm.train.losses import corrupt
from ar2mdm.train.step import resolve_device, step_losses


def chat_template_for(meta: dict, tokenizer) -> bool:
    """Whether a user's prompt goes through the chat template: as the build rendered this run's rows (plain
    `prompt` rows: no), and where the run does not say, whenever the tokenizer has a template."""
    if run_task(meta)[1] == "plain":
        return False
    return bool(getattr(tokenizer, "chat_template", None))


def _sft_rows(data: Path, files: list, tokenizer, meta: dict, max_rows: int, messages_field: str) -> list[Row]:
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
        "",
        ids,
        prompt_len,
        1.0,
        np.zeros(0, np.int32),
        np.zeros(0, np.int32),
        np.zeros(1, np.int64),
        np.zeros(0, np.int32),
        np.zeros(0, np.float32),
    )


def _rows_from(
    data: Path,
    meta: dict,
    tokenizer,
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
    if (data / "manifest.json").exists():
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
        return _sft_rows(data, files, tokenizer, meta, max_rows, messages_field), None
    rows = []
    docs = iter_documents(files, CorpusStats(), by_line=by_line, text_field=text_field)
    for ids in pack_documents(docs, tokenizer, meta["seq_len"]):
        rows.append(_row(ids, 0))
        if len(rows) >= max_rows:
            break
    if not rows:
        raise UserError(f"--data {data}: no full row of {meta['seq_len']} tokens")
    return rows, None


def ratio_se(num: torch.Tensor, den: torch.Tensor) -> float:
    """Standard error of the ratio estimate Σ num / Σ den over independent rows (delta method)."""
    n = num.numel()
    if n < 2:
        return float("nan")
    r = num.sum() / den.sum()
    return float(((num - r * den).pow(2).sum() / (n * (n - 1))).sqrt() / den.mean())


@torch.no_grad()
def elbo_row_estimates(
    model, ids: torch.Tensor, maskable: torch.Tensor, draws: int, g: torch.Generator, mask_id: int
) -> tuple[torch.Tensor, float, float]:
    """(B,) float64 unbiased estimates of each row's ELBO bound on -log p(maskable tokens | the rest), in nats,
    and the masked-token hits and count. ids, maskable: (B, L); masks are drawn on the CPU from ``g``.

    Row b with n maskable positions: (1/draws) Σ_j (n/l_j) Σ_{i masked} -log p_θ(x_i | x_t), l_j stratified.
    """
    n = maskable.sum(1).cpu()  # (B,)
    counts = stratified_counts(n, draws, g)  # (B, draws)
    est = torch.zeros(ids.shape[0], dtype=torch.float64)
    hits = total = 0.0
    for j in range(draws):
        mask = sample_count_masks(maskable.cpu(), counts[:, j], g).to(ids.device)  # (B, L)
        logits = model(corrupt(ids, mask, mask_id), mask).float()  # (M, V)
        nll = torch.nn.functional.cross_entropy(logits, ids[mask], reduction="none")  # (M,)
        per_row = torch.zeros(ids.shape[0], device=ids.device).index_add(0, mask.nonzero()[:, 0], nll)  # (B,)
        est += per_row.cpu().double() * n / counts[:, j].clamp(min=1) / draws
        hits += float((logits.argmax(-1) == ids[mask]).sum())
        total += float(mask.sum())
    return est, hits, total


@torch.no_grad()
def evaluate(cfg: EvalConfig) -> dict:
    """Held-out ELBO bound (nats/token) with its standard error, masked-token accuracy and, on shards, the
    KD loss against the stored targets.

    The bound is LLaDA's estimator of the MDLM ELBO, -log p(x) <= E_l [(n/l) Σ_{l masked} -log p_θ(x_i | x_t)]
    with l ~ U{1..n} positions masked uniformly among the n maskable ones: unbiased for the same bound as the
    1/t form, with weights at most n instead of 1/eps, and no forced mask. ``mc_samples`` draws of l per row,
    stratified. Masks depend on ``seed``, the rows and ``batch_size`` only, never on the model: two runs
    evaluated alike see the same masks, and their difference is the models'. ``per_row``: also return each
    row's estimate (``row_nll``, nats) and maskable tokens (``row_tokens``), for paired comparisons. ``split``:
    the split of a dataset ``data`` (save_to_disk folder or hf:NAME). Settings: `config.EvalConfig`.

    ``task`` "sft" (``auto``: the run's own task): ``data`` holds chats (``messages``, or ``prompt`` +
    ``response``), rendered as the SFT build renders them, and the bound covers each response's tokens through
    its end of turn, given the prompt: neither the prompt and template tokens nor the EOS padding after the
    response are scored (the padding stays visible, so the bound is given the response's length).
    """
    from dataclasses import replace

    from ar2mdm.train.data import TargetSpec

    cfg.check()
    device = resolve_device(cfg.device)
    model, meta = load_student(Path(cfg.run), device)
    tokenizer = load_tokenizer(Path(cfg.run))
    task = run_task(meta)[0] if cfg.task == "auto" else cfg.task
    rows, manifest = _rows_from(
        Path(cfg.data), meta, tokenizer, cfg.max_rows, cfg.by_line, cfg.text_field, cfg.split, task, cfg.messages_field
    )
    mc_samples, seed, batch_size = cfg.mc_samples, cfg.seed, cfg.batch_size
    from ar2mdm.shared.tokenizer import response_length, stop_ids

    stops = stop_ids(tokenizer)
    mask_id = model.config.mask_id
    g = torch.Generator().manual_seed(seed)
    row_est, row_tok = [], []
    correct = masked = 0.0
    kd_sum, kd_rows = 0.0, 0
    kd_cfg = replace(TrainConfig(**meta["train"]), lam=1.0, lambda_schedule="constant", lambda_t="none")
    spec = TargetSpec.from_manifest(manifest) if manifest is not None else None
    for a in range(0, len(rows), batch_size):
        chunk = rows[a : a + batch_size]
        ids = torch.as_tensor(np.stack([r.input_ids for r in chunk]), dtype=torch.long, device=device)  # (B, L)
        plen = torch.tensor([r.prompt_len for r in chunk], device=device)
        maskable = maskable_positions(ids.shape[1], plen)  # (B, L)
        if task == "sft":  # the response through its end of turn: [prompt_len, prompt_len + n)
            end = torch.tensor(
                [r.prompt_len + response_length(r.input_ids, r.prompt_len, stops) for r in chunk], device=device
            )
            maskable &= torch.arange(ids.shape[1], device=device)[None, :] < end[:, None]
        est, hits, k = elbo_row_estimates(model, ids, maskable, mc_samples, g, mask_id)
        correct += hits
        masked += k
        row_est.append(est)
        row_tok.append(maskable.sum(1).cpu().double())
        if spec is not None:
            _, parts = step_losses(model, collate(chunk, spec).to(device), kd_cfg, mask_id, spec)
            kd_sum += float(parts["kd"]) * len(chunk)
            kd_rows += len(chunk)
    est, tok = torch.cat(row_est), torch.cat(row_tok)
    nll_bound = float(est.sum() / tok.sum().clamp(min=1))
    out = {
        "nll_bound": nll_bound,
        "nll_bound_se": ratio_se(est, tok),
        "ppl_bound": math.exp(min(nll_bound, 50)),
        "masked_token_accuracy": correct / max(masked, 1),
        "rows": len(rows),
        "tokens": int(tok.sum()),
        "mc_samples": mc_samples,
        "seed": seed,
        "task": task,
        "uniform_nll": math.log(model.config.vocab_size),
    }
    if kd_rows:
        out["kd_loss"] = kd_sum / kd_rows
    if cfg.per_row:
        out["row_nll"], out["row_tokens"] = est.tolist(), tok.tolist()
    return out


def _prompt_row(meta: dict, tok, prompt: str, chat: bool) -> list[int]:
    """The ids a generation starts from: BOS + the prompt, through the chat template as the build rendered this
    run's rows when ``chat``."""
    from ar2mdm.shared.tokenizer import special_ids, user_prompt_row

    if chat:
        return user_prompt_row(tok, prompt, chat_template_for(meta, tok))
    return [special_ids(tok)[0]] + tok(prompt, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def sample(cfg: SampleConfig) -> tuple[str, str]:
    """LLaDA's sampler: start with ``length`` masks after the prompt; at each of ``steps`` steps predict every
    masked token (greedy, or sampled at ``temperature``), reveal as many as a linear schedule allows and keep
    the rest masked. ``remasking``: which predictions are revealed: the most confident (low-confidence
    remasking, as LLaDA) or random ones. ``block_length``: reveal block by block, left to right (LLaDA's
    semi-autoregressive decoding). ``chat`` (default: on for SFT runs): the prompt is a user turn rendered as the
    build rendered the run's rows, and the answer ends at its first end of turn (nothing after it is returned).
    Returns (prompt, completion) as text. Settings: `config.SampleConfig`."""
    cfg.check()
    device = resolve_device(cfg.device)
    model, meta = load_student(Path(cfg.run), device)
    tok = load_tokenizer(Path(cfg.run))
    prompt, length, chat = cfg.prompt, cfg.length, cfg.chat
    from ar2mdm.shared.tokenizer import stop_ids
    from ar2mdm.train.model import cut_at_stop, denoise

    chat = run_task(meta)[0] == "sft" if chat is None else chat
    p = _prompt_row(meta, tok, prompt, chat)
    if len(p) + length > model.config.max_positions:
        raise UserError(
            f"prompt ({len(p)} tokens) + --length {length} exceeds the student's {model.config.max_positions} positions"
        )
    stops = tuple(stop_ids(tok)) if chat else ()
    x = torch.tensor([p + [model.config.mask_id] * length], device=device)  # (1, P+N)
    g = torch.Generator().manual_seed(cfg.seed)
    x = denoise(model, x, cfg.steps, cfg.temperature, cfg.remasking, g, cfg.block_length, stops)
    out = x[0, len(p) :].tolist()
    if chat:
        out = cut_at_stop(out, stops)
    return prompt, tok.decode(out, skip_special_tokens=False)


MASK_MARK = "[MASK]"


@torch.no_grad()
def fill(cfg: FillConfig) -> list[list[tuple[str, float]]]:
    """The student's top predictions for each ``[MASK]`` in ``text`` (one token each), all predicted at once.

    A readable look at what a small student has learnt, where free generation is still mostly newlines.
    A space before a mask is left to the masked token (BPE vocabularies attach it to the next word).
    ``chat``: ``text`` is the answer to the user turn ``prompt``, rendered as the SFT build renders a chat,
    and it ends the turn (the end-of-turn token follows it).
    """
    from ar2mdm.shared.tokenizer import end_of_turn_id, special_ids

    cfg.check()
    text, chat, prompt = cfg.text, cfg.chat, cfg.prompt
    if MASK_MARK not in text:
        raise UserError(f"--text needs at least one {MASK_MARK}")
    device = resolve_device(cfg.device)
    model, meta = load_student(Path(cfg.run), device)
    tok = load_tokenizer(Path(cfg.run))
    bos, _ = special_ids(tok)
    pieces = text.split(MASK_MARK)
    ids = _prompt_row(meta, tok, prompt, True) if chat else [bos]
    for j, piece in enumerate(pieces):
        ids += tok(piece.rstrip(" ") if j < len(pieces) - 1 else piece, add_special_tokens=False)["input_ids"]
        if j < len(pieces) - 1:
            ids.append(model.config.mask_id)
    if chat:  # the answer ends its turn, as in the rows the student trained on
        ids.append(end_of_turn_id(tok, chat_template_for(meta, tok)))
    if len(ids) > model.config.max_positions:
        raise UserError(f"--text is {len(ids)} tokens, the student has {model.config.max_positions} positions")
    x = torch.tensor([ids], device=device)
    masked = x == model.config.mask_id
    probs = torch.softmax(model(x, masked).float(), -1).cpu()  # (M, V)
    val, idx = probs.topk(cfg.top, -1)
    return [[(tok.decode([int(i)]), float(v)) for v, i in zip(vs, ix)] for vs, ix in zip(val, idx)]


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
