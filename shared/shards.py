"""Shard I/O for schema v1, Parquet (default) and safetensors, with one flat in-memory form: `ShardData`.

`ShardData` keeps the ragged columns as flat arrays plus offsets, which is what both the safetensors layout
and Arrow's list arrays are made of, so neither writer nor reader loops over rows in Python.

    row r masks      mask_positions[mask_offsets[r]:mask_offsets[r+1]]
    row r targets    target_positions[target_offsets[r]:target_offsets[r+1]]          (P entries in all)
    target p support target_ids/target_logprobs[entry_offsets[p]:entry_offsets[p+1]]   (E entries in all)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ar2mdm.schemas.v1 import BLOCK_T, METADATA_KEY, SCHEMA_VERSION, SchemaError, check_table_schema, shard_schema

FORMATS = {"parquet": ".parquet", "safetensors": ".safetensors"}
# per-row Monte Carlo columns (null outside --mode mc; the last two absent from shards written before them)
MC_COLUMNS = {"mc_samples": np.int32, "mc_ess": np.float32, "mc_resamples": np.int32, "mc_resample_ess": np.float32}
DONE_SUFFIX = ".done"


@dataclass
class ShardData:
    example_ids: list[str]
    input_ids: np.ndarray  # (R, L) int32
    prompt_len: np.ndarray  # (R,) int32
    t: np.ndarray  # (R,) float32
    mask_offsets: np.ndarray  # (R+1,) int64
    mask_positions: np.ndarray  # (M,) int32
    target_offsets: np.ndarray  # (R+1,) int64
    target_positions: np.ndarray  # (P,) int32
    entry_offsets: np.ndarray  # (P+1,) int64
    target_ids: np.ndarray  # (E,) int32
    target_logprobs: np.ndarray  # (E,) float16 or float32
    mc_samples: np.ndarray | None = None  # (R,) int32, None outside mc mode
    mc_ess: np.ndarray | None = None  # (R,) float32
    mc_resamples: np.ndarray | None = None  # (R,) int32 (smc resamplings; None in shards written before them)
    mc_resample_ess: np.ndarray | None = None  # (R,) float32, NaN where a row did not resample
    block_t: np.ndarray | None = None  # (R, nb) float32: each block's mask ratio (block builds alone)

    @property
    def rows(self) -> int:
        return len(self.example_ids)

    @property
    def num_targets(self) -> int:
        return int(len(self.target_positions))

    def row_masks(self, r: int) -> np.ndarray:
        return self.mask_positions[self.mask_offsets[r] : self.mask_offsets[r + 1]]

    def row_targets(self, r: int) -> tuple[np.ndarray, list[np.ndarray], list[np.ndarray]]:
        """(positions (P_r,), ids per position, logprobs per position) of row r."""
        a, b = self.target_offsets[r], self.target_offsets[r + 1]
        ids = [self.target_ids[self.entry_offsets[p] : self.entry_offsets[p + 1]] for p in range(a, b)]
        lps = [self.target_logprobs[self.entry_offsets[p] : self.entry_offsets[p + 1]] for p in range(a, b)]
        return self.target_positions[a:b], ids, lps


def concat_shards(parts: list[ShardData]) -> ShardData:
    """The rows of several ShardData one after the other (offsets re-based), as one ShardData."""
    if len(parts) == 1:
        return parts[0]

    def offsets(name: str) -> np.ndarray:
        out, base = [np.zeros(1, np.int64)], 0
        for d in parts:
            o = getattr(d, name)
            out.append(o[1:] - o[0] + base)
            base = int(out[-1][-1]) if len(o) > 1 else base
        return np.concatenate(out)

    def cat(name: str):
        cols = [getattr(d, name) for d in parts]
        return None if any(c is None for c in cols) else np.concatenate(cols)

    return ShardData(
        example_ids=[e for d in parts for e in d.example_ids],
        input_ids=np.concatenate([d.input_ids for d in parts]),
        mask_offsets=offsets("mask_offsets"),
        target_offsets=offsets("target_offsets"),
        entry_offsets=offsets("entry_offsets"),
        **{
            k: cat(k)
            for k in (
                "prompt_len",
                "t",
                "mask_positions",
                "target_positions",
                "target_ids",
                "target_logprobs",
                *MC_COLUMNS,
                BLOCK_T,
            )
        },
    )


def offsets_from_lengths(lengths) -> np.ndarray:
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(np.asarray(lengths, dtype=np.int64), out=out[1:])
    return out


def to_float16_down(logprobs: np.ndarray) -> np.ndarray:
    """float16 log-probs rounded towards -inf, so that exp(stored) <= exp(true) and sums stay <= 1."""
    x = np.asarray(logprobs, dtype=np.float32)
    h = x.astype(np.float16)
    up = h.astype(np.float32) > x
    h[up] = np.nextafter(h[up], np.float16(-np.inf))
    return h


def shard_name(rank: int, index: int, fmt: str) -> str:
    return f"part-{rank:05d}-{index:05d}{FORMATS[fmt]}"


RANK_DONE_GLOB = "rank-*.done"


def rank_done_name(rank: int) -> str:
    """A finished rank's completion record (`RankInfo` as JSON)."""
    return f"rank-{rank:05d}.done"


def rank_started_name(rank: int) -> str:
    """Written as a rank starts (the digest of its corpus files): a rank without it never started."""
    return f"corpus-rank-{rank:05d}.sha256"


# ----------------------------------------------------------------------------------------------- parquet


def _list(offsets: np.ndarray, values: pa.Array, typ: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), values, type=typ)


def to_table(data: ShardData, logprob_dtype: str) -> pa.Table:
    """The v1 Arrow table of a shard, built column by column against the explicit schema."""
    schema = shard_schema(logprob_dtype, blocks=data.block_t is not None)
    R, L = data.input_ids.shape
    ints = schema.field("input_ids").type  # list<int32>
    lp_np = (
        to_float16_down(data.target_logprobs) if logprob_dtype == "float16" else data.target_logprobs.astype(np.float32)
    )
    inner_ids = _list(data.entry_offsets, pa.array(data.target_ids.astype(np.int32)), ints)
    inner_lp = _list(data.entry_offsets, pa.array(lp_np), schema.field("target_logprobs").type.value_type)
    nulls = pa.nulls(R)
    cols = {
        "example_id": pa.array(data.example_ids, pa.string()),
        "input_ids": _list(np.arange(R + 1, dtype=np.int64) * L, pa.array(data.input_ids.reshape(-1)), ints),
        "prompt_len": pa.array(data.prompt_len.astype(np.int32)),
        "t": pa.array(data.t.astype(np.float32)),
        "mask_positions": _list(data.mask_offsets, pa.array(data.mask_positions.astype(np.int32)), ints),
        "target_positions": _list(data.target_offsets, pa.array(data.target_positions.astype(np.int32)), ints),
        "target_ids": _list(data.target_offsets, inner_ids, schema.field("target_ids").type),
        "target_logprobs": _list(data.target_offsets, inner_lp, schema.field("target_logprobs").type),
    }
    for name, dtype in MC_COLUMNS.items():
        col, typ = getattr(data, name), pa.from_numpy_dtype(dtype)
        cols[name] = pa.array(col, typ) if col is not None else nulls.cast(typ)
    if data.block_t is not None:
        nb = data.block_t.shape[1]
        cols[BLOCK_T] = _list(
            np.arange(R + 1, dtype=np.int64) * nb, pa.array(data.block_t.reshape(-1)), schema.field(BLOCK_T).type
        )
    return pa.Table.from_arrays([cols[f.name] for f in schema], schema=schema)


def _flat(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, flat values) of a list column."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    lengths = pc.list_value_length(col).to_numpy(zero_copy_only=False)
    return offsets_from_lengths(lengths), pc.list_flatten(col)


def from_table(table: pa.Table) -> ShardData:
    """ShardData of a v1 table (whose schema the caller has checked)."""
    R = table.num_rows
    ids_off, ids_flat = _flat(table["input_ids"])
    L = int(ids_off[1]) if R else 0
    mask_off, mask_flat = _flat(table["mask_positions"])
    tgt_off, tgt_flat = _flat(table["target_positions"])
    _, inner_ids = _flat(table["target_ids"])
    entry_off, ids_vals = _flat(inner_ids)
    _, inner_lp = _flat(table["target_logprobs"])
    _, lp_vals = _flat(inner_lp)
    has_mc = table["mc_samples"].null_count < R if R else False

    def mc_col(name: str, dtype):
        if not has_mc or name not in table.column_names or table[name].null_count == R:  # absent from older shards
            return None
        return table[name].to_numpy(zero_copy_only=False).astype(dtype)

    block_t = None
    if BLOCK_T in table.column_names:
        _, flat = _flat(table[BLOCK_T])
        block_t = flat.to_numpy().astype(np.float32).reshape(R, -1)
    return ShardData(
        example_ids=table["example_id"].to_pylist(),
        input_ids=ids_flat.to_numpy().astype(np.int32).reshape(R, L),
        prompt_len=table["prompt_len"].to_numpy().astype(np.int32),
        t=table["t"].to_numpy().astype(np.float32),
        mask_offsets=mask_off,
        mask_positions=mask_flat.to_numpy().astype(np.int32),
        target_offsets=tgt_off,
        target_positions=tgt_flat.to_numpy().astype(np.int32),
        entry_offsets=entry_off,
        target_ids=ids_vals.to_numpy().astype(np.int32),
        target_logprobs=lp_vals.to_numpy(zero_copy_only=False),
        **{name: mc_col(name, dtype) for name, dtype in MC_COLUMNS.items()},
        block_t=block_t,
    )


# ------------------------------------------------------------------------------------------- safetensors

_ST_ARRAYS = (
    "input_ids",
    "prompt_len",
    "t",
    "mask_offsets",
    "mask_positions",
    "target_offsets",
    "target_positions",
    "entry_offsets",
    "target_ids",
    "target_logprobs",
)


def _write_safetensors(data: ShardData, path: Path, logprob_dtype: str) -> None:
    from safetensors.numpy import save_file

    tensors = {name: np.ascontiguousarray(getattr(data, name)) for name in _ST_ARRAYS}
    tensors["target_logprobs"] = (
        to_float16_down(data.target_logprobs) if logprob_dtype == "float16" else data.target_logprobs.astype(np.float32)
    )
    for name, dtype in MC_COLUMNS.items():
        if getattr(data, name) is not None:
            tensors[name] = getattr(data, name).astype(dtype)
    if data.block_t is not None:
        tensors[BLOCK_T] = data.block_t.astype(np.float32)
    meta = {
        METADATA_KEY.decode(): str(SCHEMA_VERSION),
        "logprob_dtype": logprob_dtype,
        "example_ids": json.dumps(data.example_ids),
    }
    save_file(tensors, str(path), metadata=meta)


def _read_safetensors(path: Path) -> ShardData:
    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata() or {}
        version = meta.get(METADATA_KEY.decode())
        if version is None:
            raise SchemaError(f"{path}: not an ar2mdm shard (no {METADATA_KEY.decode()} in its metadata)")
        if version != str(SCHEMA_VERSION):
            raise SchemaError(f"{path}: shard schema version {version}, this ar2mdm reads version {SCHEMA_VERSION}")
        keys = set(f.keys())
        missing = [k for k in _ST_ARRAYS if k not in keys]
        if missing:
            raise SchemaError(f"{path}: tensors missing: {', '.join(missing)}")
        arrays = {k: f.get_tensor(k) for k in keys}
    return ShardData(
        example_ids=json.loads(meta["example_ids"]),
        **{name: arrays.get(name) for name in (*MC_COLUMNS, BLOCK_T)},
        **{k: arrays[k] for k in _ST_ARRAYS},
    )


# --------------------------------------------------------------------------------------------- public


def write_shard(data: ShardData, path: str | Path, fmt: str, logprob_dtype: str) -> None:
    """Write a shard to ``path`` in ``fmt`` with the explicit v1 schema. The caller handles .tmp + rename."""
    path = Path(path)
    if fmt == "parquet":
        table = to_table(data, logprob_dtype)
        # zstd + byte-stream-split on float32 columns: log-probs compress poorly as plain bytes. Not on float16,
        # which DuckDB cannot read split (and which gains < 1% from it: 8,877 vs 8,893 bytes on the quickstart shard).
        split = ["t", "mc_ess", "mc_resample_ess"] + (
            ["target_logprobs.list.element.list.element"] if logprob_dtype == "float32" else []
        )
        pq.write_table(
            table,
            path,
            compression="zstd",
            compression_level=6,
            use_dictionary=["example_id"],
            use_byte_stream_split=split,
            write_statistics=False,
        )
    elif fmt == "safetensors":
        _write_safetensors(data, path, logprob_dtype)
    else:
        raise ValueError(f"unknown shard format {fmt!r}")


def shard_format(path: str | Path) -> str:
    suffix = Path(path).suffix
    for fmt, suf in FORMATS.items():
        if suffix == suf:
            return fmt
    raise SchemaError(f"{path}: not a shard file (expected {' or '.join(FORMATS.values())})")


def read_shard(path: str | Path, fmt: str | None = None) -> ShardData:
    """Read a whole shard of either format (``fmt``, default: from the suffix), checking its schema."""
    path = Path(path)
    if (fmt or shard_format(path)) == "safetensors":
        return _read_safetensors(path)
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise SchemaError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]})") from e
    check_table_schema(pf.schema_arrow, str(path))
    return from_table(pf.read())


def iter_shard_batches(path: str | Path, rows_per_batch: int = 256) -> Iterator[ShardData]:
    """Stream a shard in pieces of at most ``rows_per_batch`` rows (Parquet row groups are read lazily)."""
    path = Path(path)
    if shard_format(path) == "safetensors":
        yield read_shard(path)  # memory-mapped by safetensors; one piece
        return
    try:
        pf = pq.ParquetFile(path)
        check_table_schema(pf.schema_arrow, str(path))
        for batch in pf.iter_batches(batch_size=rows_per_batch):
            yield from_table(pa.Table.from_batches([batch]))
    except (OSError, pa.ArrowException) as e:  # damaged in place (same size): found only when its pages are read
        raise SchemaError(f"{path}: damaged ({str(e).splitlines()[0]}); {repair_hint(path)}") from e


def repair_hint(path: Path) -> str:
    return f"run `kdtargets validate {path.parent}`; to rebuild it, delete it and its .done marker and rerun the build"


def check_shard_file(path: Path, size: int) -> None:
    """Refuse a missing, truncated or unreadable shard in one line (size and footer only: cheap)."""
    hint = repair_hint(path)
    if not path.exists():
        raise SchemaError(f"{path}: listed in the manifest but missing; {hint}")
    if path.stat().st_size != size:
        raise SchemaError(
            f"{path}: {path.stat().st_size} bytes, the manifest says {size} (truncated or changed); {hint}"
        )
    if shard_format(path) == "parquet":
        try:
            check_table_schema(pq.ParquetFile(path).schema_arrow, str(path))
        except SchemaError:
            raise
        except Exception as e:
            raise SchemaError(f"{path}: not a readable Parquet file ({str(e).splitlines()[0]}); {hint}") from e
