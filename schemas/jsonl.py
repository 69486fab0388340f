"""What the JSONL files of ar2mdm (samples, states) share: every line one whole record carrying its format name
and version, a ``source`` shared by all lines of a file, atomic writes, and one-line errors that name the line."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, TypeVar

from ar2mdm.schemas.manifest import write_atomic
from ar2mdm.schemas.v1 import SchemaError

R = TypeVar("R")


@dataclass(frozen=True)
class RecordFormat:
    """One JSONL format: its name and version, its record dataclass and that record's ``source`` dataclass."""

    name: str  # e.g. "ar2mdm.samples"
    version: int
    record: type
    source: type

    def line(self, record) -> str:
        """A record as one JSON line, its format and version first."""
        return json.dumps({"format": self.name, "version": self.version, **dataclasses.asdict(record)})

    def parse(self, d: dict, where: str):
        """A record from one parsed line, its format and version checked. A field with a default may be absent
        (lines written before the field existed)."""
        what = self.name.split(".")[-1]
        if d.get("format") != self.name:
            raise SchemaError(f"{where}: not an ar2mdm {what} record (format {d.get('format')!r})")
        if d.get("version") != self.version:
            raise SchemaError(f"{where}: {what} version {d.get('version')}, this ar2mdm reads {self.version}")
        try:
            fields = {
                f.name: d[f.name]
                for f in dataclasses.fields(self.record)
                if f.name in d or f.default is dataclasses.MISSING
            }
            fields["source"] = self.source(**fields["source"])
            return self.record(**fields)
        except (KeyError, TypeError) as e:
            raise SchemaError(f"{where}: malformed {what} record ({type(e).__name__}: {e})") from e


def write_records(path: str | Path, lines: list[str]) -> Path:
    """Write JSON lines atomically (a reader never sees half a file)."""
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(line + "\n" for line in lines).encode())
    return path


def read_records(path: str | Path, parse: Callable[[dict, str], R], what: str) -> list[R]:
    """The records of a JSONL file (``parse(line dict, where)`` each), all of one ``source``; SchemaError (one
    line) on a missing or empty file, a line that is not JSON, or lines of different sources."""
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"{what} file {path} does not exist")
    records = []
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path} line {n}: not JSON ({e.msg})") from e
        rec = parse(d, f"{path} line {n}")
        if records and rec.source != records[0].source:
            raise SchemaError(f"{path} line {n}: another source than line 1 (one file holds one source's {what})")
        records.append(rec)
    if not records:
        raise SchemaError(f"{what} file {path} holds no {what}")
    return records
