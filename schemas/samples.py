"""Sample files (JSONL, one sample per line): what `kdtrain sample` and `kdtargets sample` write and
`kdtargets score` reads.

Every line is a whole record, so a file reads as a table (``pandas.read_json(path, lines=True)``) and two
files concatenate. All lines of one file share one ``source``: the model (or corpus) and the sampler's settings
it came from, and the tokenizer of its ids. Writers pass these dataclasses; readers check the version and every
field, and refuse a file whose lines disagree on their source.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ar2mdm.schemas.jsonl import RecordFormat, read_records, write_records
from ar2mdm.schemas.v1 import SchemaError

SAMPLES_FORMAT = "ar2mdm.samples"
SAMPLES_VERSION = 1
SOURCE_KINDS = ("student", "teacher", "text")  # a student's samples, the teacher's own, held-out text itself


@dataclass
class SampleSource:
    kind: str  # one of SOURCE_KINDS
    path: str  # the run folder, the teacher, or the corpus
    tokenizer_sha256: str  # the ids' tokenizer (shared.tokenizer.tokenizer_hash)
    step: int | None = None  # a student's checkpoint step
    settings: dict[str, Any] = field(default_factory=dict)  # the sampler's settings (steps, temperature, ...)


@dataclass
class SampleRecord:
    index: int  # the sample's number in its file (and in the seed of its draws)
    prompt: str  # the prompt as text ("" unconditional)
    prompt_ids: list[int]  # BOS + the prompt's ids: what the sample was conditioned on
    ids: list[int]  # the completion's ids, up to (without) its first stop token
    text: str  # the completion decoded: what a judge reads
    stopped: bool  # a stop token (EOS, end of turn) ended the completion before its full length
    source: SampleSource
    # the model forwards that drew it, every one counted (a block student's prefill and commits, a teacher's
    # prefill): tokens per forward = len(ids) / forwards; None where nothing was computed (held-out text)
    forwards: int | None = None

    def to_json(self) -> str:
        return SAMPLES.line(self)


SAMPLES = RecordFormat(SAMPLES_FORMAT, SAMPLES_VERSION, SampleRecord, SampleSource)


def write_samples(path: str | Path, records: list[SampleRecord]) -> Path:
    """Write ``records`` as JSONL, atomically (a reader never sees half a file)."""
    return write_records(path, [r.to_json() for r in records])


def _record(d: dict, where: str) -> SampleRecord:
    rec = SAMPLES.parse(d, where)
    if rec.source.kind not in SOURCE_KINDS:
        raise SchemaError(f"{where}: source kind {rec.source.kind!r} is not one of {', '.join(SOURCE_KINDS)}")
    if not all(isinstance(t, int) for t in rec.ids + rec.prompt_ids) or not isinstance(rec.text, str):
        raise SchemaError(f"{where}: ids must be integers and text a string")
    return rec


def read_samples(path: str | Path) -> list[SampleRecord]:
    """The records of a samples file, checked; SchemaError (one line) on anything malformed."""
    return read_records(path, _record, "samples")
