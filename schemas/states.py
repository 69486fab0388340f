"""State files (JSONL, one state per line): the states a student visited while it sampled, as `kdtrain sample
--states` writes them and `kdtargets build --states` reads them.

A state is a row ``x_t`` partway through a denoising trajectory: the positions still masked at that step, and
the visible tokens, which are the prompt and the student's own choices so far. ``input_ids`` holds the visible
tokens and, at the masked positions, the tokens the same trajectory ended with: the student's own completion,
never the truth (there is none). mc targets read only the visible tokens; topk and fim, which condition on a
whole row, condition on that completion. All lines of one file share one ``source``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ar2mdm.schemas.manifest import write_atomic
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
        return json.dumps({"format": STATES_FORMAT, "version": STATES_VERSION, **dataclasses.asdict(self)})


def write_states(path: str | Path, records: list[StateRecord]) -> Path:
    """Write ``records`` as JSONL, atomically."""
    path = Path(path)
    if path.parent != Path("."):
        path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, "".join(r.to_json() + "\n" for r in records).encode())
    return path


def _record(d: dict, where: str) -> StateRecord:
    if d.get("format") != STATES_FORMAT:
        raise SchemaError(f"{where}: not an ar2mdm states record (format {d.get('format')!r})")
    if d.get("version") != STATES_VERSION:
        raise SchemaError(f"{where}: states version {d.get('version')}, this ar2mdm reads {STATES_VERSION}")
    try:
        fields = {f.name: d[f.name] for f in dataclasses.fields(StateRecord)}
        fields["source"] = StateSource(**fields["source"])
        rec = StateRecord(**fields)
    except (KeyError, TypeError) as e:
        raise SchemaError(f"{where}: malformed states record ({type(e).__name__}: {e})") from e
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
    path = Path(path)
    if not path.is_file():
        raise SchemaError(f"states file {path} does not exist")
    records, seen = [], set()
    for n, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise SchemaError(f"{path} line {n}: not JSON ({e.msg})") from e
        rec = _record(d, f"{path} line {n}")
        if records and rec.source != records[0].source:
            raise SchemaError(f"{path} line {n}: another source than line 1 (one file holds one student's states)")
        if records and len(rec.input_ids) != len(records[0].input_ids):
            raise SchemaError(f"{path} line {n}: {len(rec.input_ids)} tokens, line 1 has {len(records[0].input_ids)}")
        if rec.example_id in seen:
            raise SchemaError(f"{path} line {n}: example id {rec.example_id} appears twice")
        seen.add(rec.example_id)
        records.append(rec)
    if not records:
        raise SchemaError(f"states file {path} holds no states")
    return records
