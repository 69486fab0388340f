"""The student a run builds from ``--student``: a preset name or a JSON file of `StudentConfig` fields."""

from __future__ import annotations

import json
from pathlib import Path

from ar2mdm.shared.errors import UserError
from ar2mdm.student.model import StudentConfig, StudentConfigError

PRESETS = {
    "tiny": dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=384),
    "small": dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=4, intermediate_size=768),
    "base": dict(hidden_size=576, num_layers=12, num_heads=9, num_kv_heads=3, intermediate_size=1536),
    # ~350M with the 49k vocabulary (tied): for a GPU
    "medium": dict(hidden_size=1024, num_layers=24, num_heads=16, num_kv_heads=8, intermediate_size=3072),
}


def checked(config: StudentConfig, where: str) -> StudentConfig:
    """``config``, or a one-line UserError naming ``where`` it came from."""
    try:
        config.check()
    except StudentConfigError as e:
        raise UserError(f"{where}: {e}") from None
    return config


def student_config(
    spec: str, vocab_size: int, max_positions: int, *, shift: bool = False, block_size: int | None = None
) -> StudentConfig:
    """A preset name or a JSON file; vocab_size comes from the shards, never from the user, and so does the block
    size of a block student."""
    if spec in PRESETS:
        fields = dict(PRESETS[spec])
    else:
        p = Path(spec)
        if not p.exists():
            raise UserError(f"--student {spec}: neither a preset ({', '.join(PRESETS)}) nor a JSON file")
        try:
            fields = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise UserError(f"--student {spec}: not valid JSON ({e.msg})") from e
        if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
            raise UserError(
                f"--student {spec}: vocab_size {fields['vocab_size']} does not fit the shards' vocabulary "
                f"({vocab_size})"
            )
        fields.pop("vocab_size", None)
    fields.setdefault("max_positions", max_positions)
    fields.setdefault("shift", shift)
    fields["block_size"] = block_size
    try:
        cfg = StudentConfig(vocab_size=vocab_size, **fields)
    except TypeError as e:
        raise UserError(f"--student {spec}: {e}") from e
    return checked(cfg, f"--student {spec}")
