"""Reading a corpus: files or folders of text, JSONL, or Parquet, into documents or SFT examples.

Bad inputs (empty files, binary files, broken JSON lines, rows without a response) are skipped with a one-line
warning that names the file and line, and counted in `CorpusStats`; a corpus with nothing usable is an error.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ar2mdm.shared.errors import UserError, warn

TEXT_SUFFIXES = (".txt", ".md", ".py")
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + (".jsonl", ".parquet")


@dataclass
class CorpusStats:
    files: int = 0
    documents: int = 0
    skipped_empty: int = 0
    skipped_binary: int = 0
    skipped_bad_rows: int = 0
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


def list_corpus_files(path: str | Path) -> list[Path]:
    """The corpus files under ``path`` (a file or a folder, recursively), in a deterministic order."""
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


def corpus_fingerprint(files: list[Path], root: str | Path) -> str:
    """sha256 over the relative names and contents of the corpus files."""
    root = Path(root)
    h = hashlib.sha256()
    for f in files:
        rel = f.name if root.is_file() else f.relative_to(root).as_posix()
        h.update(rel.encode() + b"\0")
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
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
    except UnicodeDecodeError as e:
        stats.skipped_binary += 1
        warn(f"skipping {path}: not UTF-8 text (byte {e.start})")
        return None
    if not text.strip():
        stats.skipped_empty += 1
        warn(f"skipping empty file {path}")
        return None
    return text


def _iter_records(path: Path, stats: CorpusStats) -> Iterator[tuple[str, dict[str, Any]]]:
    """(source, record) pairs of a .jsonl or .parquet file."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as e:  # pyarrow raises several types for a broken file
            stats.skipped_binary += 1
            warn(f"skipping {path}: not a readable Parquet file ({str(e).splitlines()[0]})")
            return
        if table.num_rows == 0:
            stats.skipped_empty += 1
            warn(f"skipping empty file {path}")
        for i, rec in enumerate(table.to_pylist()):
            yield f"{path}:{i}", rec
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
    files: list[Path], stats: CorpusStats, by_line: bool = False, text_field: str = "text"
) -> Iterator[Document]:
    """Pretraining documents: one per text file (or per non-empty line with ``by_line``), one per record."""
    for path in files:
        stats.files += 1
        if path.suffix in TEXT_SUFFIXES:
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
        for source, rec in _iter_records(path, stats):
            value = rec.get(text_field)
            if not isinstance(value, str) or not value.strip():
                stats.skipped_bad_rows += 1
                warn(f"{source}: no non-empty string field {text_field!r}, skipped")
                continue
            stats.documents += 1
            yield Document(source, value)


def iter_sft_examples(files: list[Path], stats: CorpusStats) -> Iterator[SftExample]:
    """SFT examples from .jsonl/.parquet records with ``prompt`` + ``response``, or ``messages``."""
    for path in files:
        stats.files += 1
        if path.suffix in TEXT_SUFFIXES:
            raise UserError(f"{path}: --task sft reads .jsonl or .parquet rows with prompt/response or messages")
        for source, rec in _iter_records(path, stats):
            messages = rec.get("messages")
            if isinstance(messages, list) and messages:
                last = messages[-1]
                if not isinstance(last, dict) or last.get("role") != "assistant" or not last.get("content"):
                    stats.skipped_bad_rows += 1
                    warn(f"{source}: SFT row without a response (last message is not a non-empty assistant turn), skipped")
                    continue
                stats.documents += 1
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
                warn(f"{source}: SFT row without a response (expected a non-empty 'response' string; fields found: {found}), skipped")
                continue
            stats.documents += 1
            yield SftExample(source, prompt=prompt, response=response)
