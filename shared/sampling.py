"""What both samplers share (`kdtrain sample`: the student; `kdtargets sample`: the teacher, or held-out text
itself): one prompt per sample, each sample's own seed, batches, and the settings that say so.

Three sources, one per command line: a single ``--prompt`` (every sample), a file of prompts (``--prompts``,
sample i takes prompt i mod their number), or held-out rows (``--prompts-from CORPUS``: sample i is prompted
with the first ``--prompt-tokens`` tokens of row i, rows being packed as the build packs them, BOS + prompt +
``--length`` tokens, so that the row's own continuation is the real text a sample is compared with). The settings
both commands take are declared here once (`SampleSettings`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Callable

from ar2mdm.schemas.samples import SampleRecord
from ar2mdm.shared.errors import UserError
from ar2mdm.shared.paths import check_output_file
from ar2mdm.shared.settings import setting


@dataclass(kw_only=True)
class SampleSettings:
    """The settings both sampling commands take (`kdtrain sample`'s `SampleConfig`, `kdtargets sample`'s
    `TeacherSampleConfig` extend it): where the prompts come from, how many samples, how long, their seeds, the
    batch and the output file."""

    num: int = setting(1, "Samples to draw (in batches of --batch-size).", at_least=1)
    prompt: str = setting("", "Text every sample continues (kept fixed); default: none (unconditional, after BOS).")
    prompts: str | None = setting(
        None,
        "A file of prompts, one per line (.txt) or a 'prompt' field per line (.jsonl); sample i takes prompt i mod "
        "their number.",
    )
    prompts_from: str | None = setting(
        None,
        "A held-out corpus: sample i continues the first --prompt-tokens tokens of its row i (rows of BOS + prompt "
        "+ --length tokens, packed as the build packs), whose own continuation is the real text to compare with.",
    )
    prompt_tokens: int = setting(
        8, "--prompts-from: prompt tokens taken from each row (after BOS; 0: unconditional).", at_least=0
    )
    split: str = setting("test", "--prompts-from a dataset (save_to_disk folder or hf:NAME): its split.")
    length: int = setting(32, "Tokens to generate.", at_least=1)
    seed: int = setting(0, "Seed of the draws: sample i draws from its own stream, made from (seed, i).")
    batch_size: int = setting(16, "Samples per forward (prompts of one length go together).", at_least=1)
    out: str | None = setting(
        None, "Write the samples to this JSONL file (text, ids, settings, source); default: print them."
    )


@dataclass
class Prompt:
    text: str  # the prompt as text
    ids: list[int]  # BOS + the prompt's ids
    reference: list[int] | None = None  # --prompts-from: the row's own continuation (the real text)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample ``index``'s draws: a sample's draws depend on (seed, index) only, never on the batch it
    was drawn in, so a file is the same whatever --batch-size made it."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{index}".encode()).digest()[:8], "little") & (2**63 - 1)


def check_sample_settings(cfg) -> None:
    """One source of prompts at most, a readable one, and a writable --out (cheap: before any model loads)."""
    given = [f"--{n}" for n in ("prompts", "prompts_from") if getattr(cfg, n)] + (["--prompt"] if cfg.prompt else [])
    if len(given) > 1:
        raise UserError(f"{' and '.join(given)}: give one source of prompts")
    if cfg.prompts and not Path(cfg.prompts).is_file():
        raise UserError(f"--prompts {cfg.prompts} does not exist")
    if cfg.prompts_from and not cfg.prompts_from.startswith("hf:") and not Path(cfg.prompts_from).exists():
        raise UserError(f"--prompts-from {cfg.prompts_from} does not exist")
    if cfg.out:
        check_output_file(Path(cfg.out), "--out")


def _file_prompts(path: Path) -> list[str]:
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    if path.suffix != ".jsonl":
        return lines
    out = []
    for n, line in enumerate(lines, start=1):
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"--prompts {path} line {n}: not JSON ({e.msg})") from e
        if not isinstance(d, dict) or not isinstance(d.get("prompt"), str):
            raise UserError(f"--prompts {path} line {n}: no 'prompt' text field")
        out.append(d["prompt"])
    return out


def corpus_prompts(corpus: str, tokenizer, *, prompt_tokens: int, length: int, num: int, split: str) -> list[Prompt]:
    """The first ``num`` rows of ``corpus`` packed into rows of 1 + prompt_tokens + length ids: each row's BOS and
    first ``prompt_tokens`` tokens are a prompt, the rest its reference continuation."""
    from ar2mdm.shared.corpus import CorpusStats, iter_documents, list_corpus_files
    from ar2mdm.shared.tokenizer import pack_documents

    files = list_corpus_files(corpus, split)
    docs = iter_documents(files, CorpusStats())
    rows = list(islice(pack_documents(docs, tokenizer, 1 + prompt_tokens + length), num))
    if len(rows) < num:
        raise UserError(
            f"--prompts-from {corpus}: {len(rows)} rows of {1 + prompt_tokens + length} tokens, --num asks for {num}"
        )
    cut = 1 + prompt_tokens
    return [Prompt(tokenizer.decode(r[1:cut].tolist()), r[:cut].tolist(), r[cut:].tolist()) for r in rows]


def prompts_for(cfg, tokenizer, length: int, render: Callable[[str], list[int]] | None = None) -> list[Prompt]:
    """One prompt per sample (``cfg.num`` of them) from the settings' source; ``render`` turns a prompt's text
    into the ids a sample starts from (default: BOS + its ids; a chat student renders a user turn)."""
    from ar2mdm.shared.tokenizer import text_row

    if cfg.prompts_from:
        return corpus_prompts(
            cfg.prompts_from, tokenizer, prompt_tokens=cfg.prompt_tokens, length=length, num=cfg.num, split=cfg.split
        )
    render = render or (lambda text: text_row(tokenizer, text))
    texts = _file_prompts(Path(cfg.prompts)) if cfg.prompts else [cfg.prompt]
    if not texts:
        raise UserError(f"--prompts {cfg.prompts} holds no prompt")
    rendered = [Prompt(t, render(t)) for t in texts]
    return [rendered[i % len(rendered)] for i in range(cfg.num)]


def batches_of(prompts: list[Prompt], batch_size: int) -> list[list[int]]:
    """Sample indices in batches of at most ``batch_size`` whose prompts are equally long (a batch is one
    (B, P + length) tensor: no padding, which a bidirectional student would attend to)."""
    by_len: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_len.setdefault(len(p.ids), []).append(i)
    return [idx[a : a + batch_size] for _, idx in sorted(by_len.items()) for a in range(0, len(idx), batch_size)]


def sample_record(
    index: int, prompt: Prompt, ids: list[int], tokenizer, *, stops: list[int], source, forwards: int | None
) -> SampleRecord:
    """Sample ``index``'s record: the ``ids`` drawn after ``prompt`` up to their first stop token (a sample ends
    where its text ends), their text, whether a stop token ended them early, and the ``forwards`` that drew them."""
    stop = next((j for j, t in enumerate(ids) if t in stops), None)
    kept = ids if stop is None else ids[:stop]
    return SampleRecord(
        index=index,
        prompt=prompt.text,
        prompt_ids=prompt.ids,
        ids=kept,
        text=tokenizer.decode(kept, skip_special_tokens=False),
        stopped=stop is not None,
        source=source,
        forwards=forwards,
    )


def source_settings(cfg, fields: tuple[str, ...]) -> dict:
    """What a samples file records of how it was drawn: the sampler's ``fields`` and the prompts' source."""
    if cfg.prompts_from:
        prompts = {"prompts_from": cfg.prompts_from, "prompt_tokens": cfg.prompt_tokens, "split": cfg.split}
    else:
        prompts = {"prompts": cfg.prompts} if cfg.prompts else {"prompt": cfg.prompt}
    return {**{k: getattr(cfg, k) for k in fields}, **prompts, "num": cfg.num}
