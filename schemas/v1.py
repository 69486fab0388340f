"""Shard schema, version 1: one row per (sequence, sampled mask).

Columns (a public contract; see docs/schema.md):

- ``example_id``       string: ``{rank:05d}-{sequence:08d}-m{mask}``, unique within a build.
- ``input_ids``        list<int32>, length ``seq_len``: the clean sequence; position 0 is BOS, never masked.
- ``prompt_len``       int32: number of leading positions that are never masked (0 for pretrain rows;
                       for SFT rows it counts BOS and the prompt).
- ``t``                float32: the masking ratio the row's mask was drawn with.
- ``mask_positions``   list<int32>: the masked positions, ascending.
- ``target_positions`` list<int32>: positions that carry a soft target, ascending. Equal to
                       ``mask_positions`` with ``--positions masked``; every maskable position with ``all``.
- ``target_ids``       list<list<int32>>: per target position, up to top-N token ids, most probable first.
- ``target_logprobs``  list<list<float16|float32>>: log q of those ids at temperature 1. ``exp`` sums to <= 1;
                       the rest is the teacher's mass outside the stored support. float16 values are rounded
                       towards -inf so that the sum bound holds after rounding.
- ``mc_samples``       int32, null outside ``--mode mc``: number of Monte Carlo completions K.
- ``mc_ess``           float32, null outside ``--mode mc``: effective sample size 1/sum(w_k^2).
- ``mc_resamples``     int32, null outside ``--mode mc``: times the row's particles were resampled (smc).
- ``mc_resample_ess``  float32, null outside ``--mode mc``: mean ESS just before those resamplings (NaN: none).

- ``block_t``          list<float32>, only in builds for block students (``--block-size`` B below ``seq_len``): the
                       mask ratio of each of the row's L/B blocks, each block masked at its own; ``t`` is then
                       their mean.

``mc_resamples`` and ``mc_resample_ess`` are nullable columns added within version 1 (ar2mdm 0.3): writers always
write them; readers accept shards that lack them (read as null). ``block_t`` is written by block builds alone, so
a whole-row build's shards are the same bytes with or without block support; readers take its absence for one
block per row.
"""

from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = 1
METADATA_KEY = b"ar2mdm.schema_version"
LOGPROB_TYPES = {"float16": pa.float16(), "float32": pa.float32()}
# columns added within version 1: a shard written before them is still a v1 shard
ADDED_COLUMNS = ("mc_resamples", "mc_resample_ess")
BLOCK_T = "block_t"  # the column of block builds alone


class SchemaError(ValueError):
    """A shard or manifest does not match the schema this version of ar2mdm reads."""


def _list(t: pa.DataType) -> pa.DataType:
    # Parquet names list items "element"; naming them so here keeps written and read-back schemas equal.
    return pa.list_(pa.field("element", t))


def shard_schema(logprob_dtype: str = "float16", blocks: bool = False) -> pa.Schema:
    """The pyarrow schema of a v1 shard; ``logprob_dtype`` is ``float16`` or ``float32``; ``blocks``: with the
    ``block_t`` column of a build for block students."""
    if logprob_dtype not in LOGPROB_TYPES:
        raise SchemaError(f"logprob dtype must be one of {sorted(LOGPROB_TYPES)}, got {logprob_dtype!r}")
    lp = LOGPROB_TYPES[logprob_dtype]
    fields = [
        pa.field("example_id", pa.string(), nullable=False),
        pa.field("input_ids", _list(pa.int32()), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("t", pa.float32(), nullable=False),
        pa.field("mask_positions", _list(pa.int32()), nullable=False),
        pa.field("target_positions", _list(pa.int32()), nullable=False),
        pa.field("target_ids", _list(_list(pa.int32())), nullable=False),
        pa.field("target_logprobs", _list(_list(lp)), nullable=False),
        pa.field("mc_samples", pa.int32(), nullable=True),
        pa.field("mc_ess", pa.float32(), nullable=True),
        pa.field("mc_resamples", pa.int32(), nullable=True),
        pa.field("mc_resample_ess", pa.float32(), nullable=True),
    ]
    if blocks:
        fields.append(pa.field(BLOCK_T, _list(pa.float32()), nullable=False))
    return pa.schema(fields, metadata={METADATA_KEY: str(SCHEMA_VERSION).encode()})


def check_table_schema(schema: pa.Schema, where: str) -> str:
    """Check a shard's schema against v1 and return its logprob dtype name; raise SchemaError otherwise."""
    meta = schema.metadata or {}
    version = meta.get(METADATA_KEY)
    if version is None:
        raise SchemaError(f"{where}: not an ar2mdm shard (no {METADATA_KEY.decode()} in its metadata)")
    if version.decode() != str(SCHEMA_VERSION):
        raise SchemaError(
            f"{where}: shard schema version {version.decode()}, this ar2mdm reads version {SCHEMA_VERSION}"
        )
    try:
        lp_type = schema.field("target_logprobs").type.value_type.value_type
    except (KeyError, AttributeError) as e:
        raise SchemaError(f"{where}: column target_logprobs missing or malformed") from e
    names = [n for n, t in LOGPROB_TYPES.items() if t == lp_type]
    if not names:
        raise SchemaError(f"{where}: target_logprobs has value type {lp_type}, expected float16 or float32")
    expected = shard_schema(names[0], blocks=BLOCK_T in schema.names)
    for f in expected:
        if f.name not in schema.names:
            if f.name in ADDED_COLUMNS:
                continue
            raise SchemaError(f"{where}: column {f.name} missing")
        got = schema.field(f.name).type
        if got != f.type:
            raise SchemaError(f"{where}: column {f.name} has type {got}, expected {f.type}")
    return names[0]
