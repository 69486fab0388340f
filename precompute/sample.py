"""`kdtargets sample`: the anchors a student's samples are judged beside, as samples files.

``--source teacher``: the teacher's own samples, drawn token by token (prefill, then one decode step per token on
the KV cache of `decode`), under the same prompts and length as the student's. ``--source text``: the held-out
rows' own continuations (``--prompts-from``), the real text. Both end a sample at its first EOS, as the student's.
"""

from __future__ import annotations

import torch

from ar2mdm.precompute.config import TeacherSampleConfig
from ar2mdm.schemas.samples import SampleRecord, SampleSource
from ar2mdm.shared.sampling import batches_of, prompts_for, sample_record, sample_seed, source_settings
from ar2mdm.student.draw import inverse_cdf


def draw(logits: torch.Tensor, temperature: float, generators: list[torch.Generator]) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: row b drawn from softmax(logits / T) by `draw.inverse_cdf` at a
    uniform from its own generator (T = 0: the most probable)."""
    logits = logits.float().cpu()
    if temperature == 0:
        return logits.argmax(-1)
    u = torch.cat([torch.rand(1, generator=g, dtype=torch.float64) for g in generators])  # (B,)
    return inverse_cdf(torch.log_softmax(logits / temperature, -1).exp(), u)


@torch.no_grad()
def ar_sample(decoder, prompts: torch.Tensor, length: int, *, temperature: float, seeds: list[int], stops: list[int]):
    """(B, n) ids continuing ``prompts`` (B, P) (one length), n <= length: every row drawn until it holds a stop
    token or ``length`` tokens (a row that stopped early is cut later, `shared.sampling.sample_record`)."""
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    stop = torch.tensor(stops)
    logits = decoder.prefill(prompts, 1)  # (B, V)
    out, ended = [], torch.zeros(len(seeds), dtype=torch.bool)
    for j in range(length):
        tok = draw(logits, temperature, generators)  # (B,)
        out.append(tok)
        ended |= torch.isin(tok, stop)
        if bool(ended.all()) or j == length - 1:
            break
        logits = decoder.decode(tok.to(prompts.device))
    return torch.stack(out, 1)


def sample(cfg: TeacherSampleConfig) -> list[SampleRecord]:
    """The teacher's samples (or the held-out text's continuations) as records of the samples schema."""
    from ar2mdm.precompute.decode import decoder_for
    from ar2mdm.precompute.teacher import TorchTeacher, load_tokenizer, resolve_teacher
    from ar2mdm.shared.defaults import default_teacher
    from ar2mdm.shared.tokenizer import special_ids, tokenizer_hash

    cfg.check()
    folder, _ = resolve_teacher(cfg.teacher)
    tok = load_tokenizer(folder)
    prompts = prompts_for(cfg, tok, cfg.length)
    stops = [special_ids(tok)[1]]
    settings = source_settings(cfg, ("length", "temperature", "seed"))
    if cfg.source == "text":
        source = SampleSource("text", str(cfg.prompts_from), tokenizer_hash(tok), None, settings)
        return [record(i, p, p.reference, stops, tok, source=source) for i, p in enumerate(prompts)]
    teacher = TorchTeacher.load(folder, cfg.device, cfg.dtype)
    source = SampleSource("teacher", str(cfg.teacher or default_teacher()), tokenizer_hash(tok), None, settings)
    records: list[SampleRecord | None] = [None] * len(prompts)
    decoders = {}  # one per row length, kept across batches (a static cache and its compiled step on CUDA)
    for batch in batches_of(prompts, cfg.batch_size):
        x = torch.tensor([prompts[i].ids for i in batch], device=teacher.device)  # (B, P)
        L = x.shape[1] + cfg.length
        decoder = decoders[L] = decoders.get(L) or decoder_for(teacher.model, L)
        seeds = [sample_seed(cfg.seed, i) for i in batch]
        out = ar_sample(decoder, x, cfg.length, temperature=cfg.temperature, seeds=seeds, stops=stops)
        for i, row in zip(batch, out.tolist()):
            records[i] = record(i, prompts[i], row, stops, tok, source=source)
    return records


def record(index: int, prompt, row: list[int], stops: list[int], tok, *, source: SampleSource) -> SampleRecord:
    """A sample's record: the teacher's drew one token per forward (its prefill's included), the stop too; held-out
    text took none."""
    rec = sample_record(index, prompt, row, tok, stops=stops, source=source, forwards=None)
    if source.kind == "teacher":
        rec.forwards = len(rec.ids) + rec.stopped
    return rec
