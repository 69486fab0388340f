"""State files (JSONL, one state per line): the states a student visited while it sampled, as `kdtrain sample
--states` writes them and `kdtargets build --states` reads them.

A state is a row ``x_t`` partway through a denoising trajectory: the positions still masked at that step, and
the visible tokens, which are the prompt and the student's own choices so far. ``input_ids`` holds the visible
tokens and, at the masked positions, the tokens the same trajectory ended with: the student's own completion,
never the truth (there is none). mc targets read only the visible tokens; topk and fim, which condition on a
whole row, condition on that completion. All lines of one file share one ``source``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ar2mdm.schemas.jsonl import RecordFormat, read_records, write_records
from ar2mdm.schemas.v1 import SchemaError

STATES_FORMAT = "ar2mdm.states"
STATES_VERSION = 1


@dataclass
class StateSource:
    run: str  # the student's run folder
    step: int | None  # its checkpoint's training step
    tokenizer_sha256: str
    sampler: dict[str, Any] = field(default_factory=dict)  # the sampler's settings, and which states were kept


@dataclass
class StateRecord:
    example_id: str  # unique in the file: "s{sample:06d}-t{step:03d}"
    input_ids: list[int]  # (L,) the state's visible tokens; at its masked positions, the trajectory's final ones
    prompt_len: int  # BOS + prompt: never masked
    mask_positions: list[int]  # ascending: the positions still masked in this state
    step: int  # the sampling step this state is the input of (0: nothing revealed yet)
    steps: int  # the trajectory's steps
    source: StateSource

    def to_json(self) -> str:
        return STATES.line(self)


STATES = RecordFormat(STATES_FORMAT, STATES_VERSION, StateRecord, StateSource)


def write_states(path: str | Path, records: list[StateRecord]) -> Path:
    """Write ``records`` as JSONL, atomically."""
    return write_records(path, [r.to_json() for r in records])


def _record(d: dict, where: str) -> StateRecord:
    rec = STATES.parse(d, where)
    L, m = len(rec.input_ids), rec.mask_positions
    if not m:
        raise SchemaError(f"{where}: state {rec.example_id} has no masked position (nothing to build a target for)")
    if m != sorted(set(m)) or m[0] < max(1, rec.prompt_len) or m[-1] >= L:
        raise SchemaError(
            f"{where}: state {rec.example_id}: masked positions must ascend within [prompt_len, {L}) (BOS and prompt "
            "stay visible)"
        )
    return rec


def read_states(path: str | Path) -> list[StateRecord]:
    """The records of a states file, checked: one source, one row length, unique ids; SchemaError (one line)."""
    records = read_records(path, _record, "states")
    seen = set()
    for rec in records:
        if len(rec.input_ids) != len(records[0].input_ids):
            raise SchemaError(f"{path}: state {rec.example_id} is {len(rec.input_ids)} tokens, the first is "
                              f"{len(records[0].input_ids)}")  # fmt: skip
        if rec.example_id in seen:
            raise SchemaError(f"{path}: example id {rec.example_id} appears twice")
        seen.add(rec.example_id)
    return records
