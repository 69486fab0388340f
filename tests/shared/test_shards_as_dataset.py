"""Shards are a dataset: `datasets`, pandas and DuckDB read a build's Parquet shards with the columns
docs/schema.md documents, and agree with ar2mdm's own reader."""

import numpy as np
import pytest

from ar2mdm.schemas import Manifest, shard_schema
from ar2mdm.shared.shards import read_shard

COLUMNS = [f.name for f in shard_schema()]


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, tiny_teacher):
    from tests.train.conftest import build_tiny_shards

    d = tmp_path_factory.mktemp("dataset")
    return build_tiny_shards(d / "shards", tiny_teacher, d / "corpus")


def own_rows(shards):
    m = Manifest.load(shards)
    return [read_shard(shards / s.file) for s in m.shards]


def test_datasets_load_dataset_reads_the_shards(tiny_shards, tmp_path):
    import datasets

    ds = datasets.load_dataset(
        "parquet", data_files=str(tiny_shards / "*.parquet"), split="train", cache_dir=str(tmp_path / "cache")
    )
    assert ds.column_names == COLUMNS
    parts = own_rows(tiny_shards)
    assert ds.num_rows == sum(p.rows for p in parts)
    by_id = {r["example_id"]: r for r in ds}
    for data in parts:
        for r in range(data.rows):
            row = by_id[data.example_ids[r]]
            pos, ids, lps = data.row_targets(r)
            assert row["input_ids"] == data.input_ids[r].tolist()
            assert row["target_positions"] == pos.tolist()
            assert row["target_ids"] == [i.tolist() for i in ids]
            np.testing.assert_allclose(
                np.concatenate(row["target_logprobs"]), np.concatenate(lps).astype(np.float32), rtol=1e-3
            )


def test_pandas_and_duckdb_read_the_shards(tiny_shards):
    import pandas as pd

    duckdb = pytest.importorskip("duckdb", reason="duckdb is in the test extra")
    parts = own_rows(tiny_shards)
    files = sorted(str(f) for f in tiny_shards.glob("*.parquet"))
    df = pd.read_parquet(files, columns=["example_id", "mask_positions", "target_positions"])
    assert len(df) == sum(p.rows for p in parts)
    n_masked = duckdb.sql(f"select sum(len(mask_positions)) from '{tiny_shards}/*.parquet'").fetchall()[0][0]
    assert n_masked == sum(len(p.mask_positions) for p in parts) == int(df.mask_positions.map(len).sum())
    # the mass each stored target keeps, in SQL (the docs' example)
    q = duckdb.sql(f"""select avg(s) from (select list_sum(list_transform(l, lambda x: exp(x))) as s
                       from (select unnest(target_logprobs) as l from '{tiny_shards}/*.parquet'))""").fetchall()[0][0]
    mass = np.mean(
        [
            np.exp(p.target_logprobs[p.entry_offsets[j] : p.entry_offsets[j + 1]].astype(np.float64)).sum()
            for p in parts
            for j in range(p.num_targets)
        ]
    )
    assert q == pytest.approx(mass, rel=1e-3) and 0 < q <= 1 + 1e-6
