"""Reading a corpus: files or folders of text, JSONL, or Parquet, or a `datasets` dataset, into documents or SFT
examples.

Bad inputs (empty files, binary files, broken JSON lines, rows without a response) are skipped with a one-line
warning that names the file and line (or the dataset row), and counted in `CorpusStats`; a corpus with nothing
usable is an error. Why files are read here rather than by ``load_dataset("text"|"json"|"parquet", ...)``:
docs/design.md ("Corpus input").
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Iterator

from ar2mdm.shared.digest import update_with_file
from ar2mdm.shared.errors import UserError, warn
from ar2mdm.shared.split import Share, share_of

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_binary: int = 0
    skipped_bad_rows: int = 0
    sft_chats: int = 0  # --task sft: rows read as a chat (`messages`, rendered through the chat template)
    sft_pairs: int = 0  # --task sft: rows read as plain `prompt` + `response` text
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Document:
    source: str  # "file" or "file:line"
    text: str


@dataclass(frozen=True)
class SftExample:
    source: str
    prompt: str | None = None
    response: str | None = None
    messages: list[dict[str, Any]] | None = None


HF_PREFIX = "hf:"


@dataclass(frozen=True)
class DatasetCorpus:
    """A `datasets` dataset used as a corpus: a ``save_to_disk`` folder, or ``hf:NAME[:CONFIG]`` (a dataset in the
    local Hugging Face cache, read offline; NAME may also be a local dataset repository folder). Rows are read
    from Arrow files that datasets memory-maps, in batches, so memory does not grow with the dataset."""

    spec: str
    split: str

    @property
    def name(self) -> str:
        return f"{self.spec}[{self.split}]"

    @cached_property
    def dataset(self):
        """The `datasets.Dataset` of this split, loaded once (fingerprint and records both read it); a one-line
        UserError when it cannot be had offline."""
        import os

        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the network at run time
        import datasets

        from ar2mdm.shared.hfmodel import first_line

        if self.spec.startswith(HF_PREFIX):
            name, _, config = self.spec[len(HF_PREFIX) :].partition(":")
            try:
                return datasets.load_dataset(name, config or None, split=self.split)
            except Exception as e:  # datasets raises many types; the first line says which
                raise UserError(
                    f"dataset {name}: cannot be loaded offline ({first_line(e)}); load it once where there "
                    f"is network, or pass a save_to_disk folder"
                ) from e
        try:
            ds = datasets.load_from_disk(self.spec)
        except Exception as e:
            raise UserError(f"{self.spec}: not a readable save_to_disk dataset ({first_line(e)})") from e
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise UserError(f"{self.spec}: no split {self.split!r} (splits: {', '.join(ds)}); pass --split")
            ds = ds[self.split]
        return ds

    def fingerprint(self) -> str:
        """datasets' own fingerprint of the loaded split (derived from its files and the transforms applied)."""
        return hashlib.sha256(f"{self.name}\0{self.dataset._fingerprint}".encode()).hexdigest()

    def records(
        self, fields: tuple[str, ...], stats: CorpusStats, batch: int = 1024
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        """(source, record) pairs with only ``fields`` (those the dataset has) read."""
        ds = self.dataset
        have = [f for f in fields if f in ds.column_names]
        if not have:
            raise UserError(
                f"{self.name}: none of the fields {', '.join(fields)} (columns: {', '.join(ds.column_names)}); "
                f"pass --text-field or --messages-field"
            )
        if len(ds) == 0:
            stats.skipped_empty += 1
            warn(f"skipping empty dataset {self.name}")
        i = 0
        for cols in ds.select_columns(have).iter(batch_size=batch):
            for j in range(len(cols[have[0]])):
                yield f"{self.name}:{i}", {f: cols[f][j] for f in have}
                i += 1


def is_dataset(path: str | Path) -> bool:
    """``hf:NAME`` or a folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    p = Path(path)
    return str(path).startswith(HF_PREFIX) or (
        p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists())
    )


def list_corpus_files(path: str | Path, split: str = "train") -> list[Path | DatasetCorpus]:
    """The corpus files under ``path`` (a file or a folder, recursively), in a deterministic order; a dataset
    (``hf:NAME`` or a save_to_disk folder) is one `DatasetCorpus` entry of the given split."""
    if is_dataset(path):
        return [DatasetCorpus(str(path), split)]
    p = Path(path)
    if not p.exists():
        raise UserError(f"corpus {p} does not exist")
    if p.is_file():
        if p.suffix not in SUPPORTED_SUFFIXES:
            raise UserError(f"corpus file {p}: unsupported suffix {p.suffix!r} (use {', '.join(SUPPORTED_SUFFIXES)})")
        return [p]
    files = sorted(
        (f for f in p.rglob("*") if f.is_file() and f.suffix in SUPPORTED_SUFFIXES and not f.name.startswith(".")),
        key=lambda f: f.relative_to(p).as_posix(),
    )
    if not files:
        raise UserError(f"corpus {p} holds no {', '.join(SUPPORTED_SUFFIXES)} files")
    return files


def _rel(f: Path, root: Path) -> str:
    return f.name if root.is_file() else f.relative_to(root).as_posix()


def corpus_fingerprint(files: list[Path | DatasetCorpus], root: str | Path) -> str:
    """sha256 over the relative names and sizes of the corpus files (a dataset: its datasets fingerprint).

    Names and sizes only, so that every rank computes it from a listing without reading every byte; the
    contents are checked per rank over the files that rank reads (`files_sha256`)."""
    if len(files) == 1 and isinstance(files[0], DatasetCorpus):
        return files[0].fingerprint()
    root = Path(root)
    h = hashlib.sha256()
    for f in files:
        h.update(f"{_rel(f, root)}\0{f.stat().st_size}\0".encode())
    return h.hexdigest()


def files_sha256(files: list[Path | DatasetCorpus], root: str | Path) -> str:
    """sha256 over the relative names and contents of some corpus files (a dataset: its datasets fingerprint)."""
    if len(files) == 1 and isinstance(files[0], DatasetCorpus):
        return files[0].fingerprint()
    root = Path(root)
    h = hashlib.sha256()
    for f in files:
        h.update(_rel(f, root).encode() + b"\0")
        update_with_file(h, f)
        h.update(b"\0")
    return h.hexdigest()


def _read_text(path: Path, stats: CorpusStats) -> str | None:
    data = path.read_bytes()
    if b"\0" in data[:8192]:
        stats.skipped_binary += 1
        warn(f"skipping binary file {path}")
        return None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:  # text with a stray byte (latin-1, a damaged line): kept, the byte replaced
        text = data.decode("utf-8", errors="replace")
        n = text.count("\ufffd") - data.count("\ufffd".encode())
        warn(f"{path}: {n} byte sequence(s) that are not UTF-8 (the first at byte {e.start}) replaced by U+FFFD")
    if not text.strip():
        stats.skipped_empty += 1
        warn(f"skipping empty file {path}")
        return None
    return text


def _iter_records(
    path: Path | DatasetCorpus, stats: CorpusStats, fields: tuple[str, ...]
) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, record) pairs of a .jsonl or .parquet file, or of a dataset (only ``fields`` read from it)."""
    if isinstance(path, DatasetCorpus):
        yield from path.records(fields, stats)
        return
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            stats.skipped_binary += 1
            warn(f"skipping {path}: not a readable Parquet file ({str(e).splitlines()[0]})")
            return
        if pf.metadata.num_rows == 0:
            stats.skipped_empty += 1
            warn(f"skipping empty file {path}")
        # row groups one batch at a time, only the fields asked for: memory stays flat on large files
        cols = [f for f in fields if f in pf.schema_arrow.names]
        i = 0
        for batch in pf.iter_batches(batch_size=1024, columns=cols):
            for rec in batch.to_pylist():
                yield f"{path}:{i}", rec
                i += 1
        return
    text = _read_text(path, stats)
    if text is None:
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            stats.skipped_bad_rows += 1
            warn(f"{path}:{lineno}: not valid JSON ({e.msg}), skipped")
            continue
        if not isinstance(rec, dict):
            stats.skipped_bad_rows += 1
            warn(f"{path}:{lineno}: not a JSON object, skipped")
            continue
        yield f"{path}:{lineno}", rec


def iter_documents(
    files: list[Path | DatasetCorpus], stats: CorpusStats, by_line: bool = False, text_field: str = "text"
) -> Iterator[Document]:
    """Pretraining documents: one per text file (or per non-empty line with ``by_line``), one per record."""
    for path in files:
        stats.files += 1
        if isinstance(path, Path) and path.suffix in TEXT_SUFFIXES:
            text = _read_text(path, stats)
            if text is None:
                continue
            if by_line:
                for lineno, line in enumerate(text.splitlines(), 1):
                    if line.strip():
                        stats.documents += 1
                        yield Document(f"{path}:{lineno}", line)
            else:
                stats.documents += 1
                yield Document(str(path), text)
            continue
        for source, rec in _iter_records(path, stats, (text_field,)):
            value = rec.get(text_field)
            if not isinstance(value, str) or not value.strip():
                stats.skipped_bad_rows += 1
                warn(f"{source}: no non-empty string field {text_field!r}, skipped")
                continue
            stats.documents += 1
            yield Document(source, value)


def iter_sft_examples(
    files: list[Path | DatasetCorpus], stats: CorpusStats, messages_field: str = "messages"
) -> Iterator[SftExample]:
    """SFT examples from .jsonl/.parquet/dataset records with ``prompt`` + ``response``, or ``messages_field``."""
    for path in files:
        stats.files += 1
        if isinstance(path, Path) and path.suffix in TEXT_SUFFIXES:
            raise UserError(f"{path}: --task sft reads .jsonl or .parquet rows with prompt/response or messages")
        for source, rec in _iter_records(path, stats, (messages_field, "prompt", "response")):
            messages = rec.get(messages_field)
            if isinstance(messages, list) and messages:
                last = messages[-1]
                if not isinstance(last, dict) or last.get("role") != "assistant" or not last.get("content"):
                    stats.skipped_bad_rows += 1
                    warn(
                        f"{source}: SFT row without a response (last message is not a non-empty assistant turn), "
                        f"skipped"
                    )
                    continue
                stats.documents += 1
                stats.sft_chats += 1
                yield SftExample(source, messages=messages)
                continue
            prompt, response = rec.get("prompt"), rec.get("response")
            found = ", ".join(sorted(map(str, rec))) or "none"
            if not isinstance(prompt, str):
                stats.skipped_bad_rows += 1
                warn(f"{source}: SFT row without a 'prompt' string or 'messages' (fields found: {found}), skipped")
                continue
            if not isinstance(response, str) or not response.strip():
                stats.skipped_bad_rows += 1
                warn(
                    f"{source}: SFT row without a response (expected a non-empty 'response' string; fields found: "
                    f"{found}), skipped"
                )
                continue
            stats.documents += 1
            stats.sft_pairs += 1
            yield SftExample(source, prompt=prompt, response=response)


def rank_share(files: list[Path | DatasetCorpus], rank: int, world_size: int) -> Share:
    """A rank's share of the corpus (`shared.split`): a dataset is split by record."""
    return share_of(files, rank, world_size, by_file=not (files and isinstance(files[0], DatasetCorpus)))
