import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ar2mdm.schemas import SchemaError, shard_schema
from ar2mdm.shared.shards import ShardData, offsets_from_lengths, read_shard, to_float16_down, to_table, write_shard


def make_data(rng, rows=5, L=16, mc=False) -> ShardData:
    masks = [
        np.sort(rng.choice(np.arange(1, L), size=rng.integers(1, 6), replace=False)).astype(np.int32)
        for _ in range(rows)
    ]
    entries = [int(rng.integers(1, 5)) for m in masks for _ in m]
    lp = np.log(rng.dirichlet(np.ones(6), size=len(entries))[:, :4]).astype(np.float32)
    return ShardData(
        example_ids=[f"00000-{r:08d}-m0" for r in range(rows)],
        input_ids=rng.integers(0, 100, size=(rows, L)).astype(np.int32),
        prompt_len=np.zeros(rows, np.int32),
        t=rng.random(rows).astype(np.float32),
        mask_offsets=offsets_from_lengths([len(m) for m in masks]),
        mask_positions=np.concatenate(masks),
        target_offsets=offsets_from_lengths([len(m) for m in masks]),
        target_positions=np.concatenate(masks),
        entry_offsets=offsets_from_lengths(entries),
        target_ids=rng.integers(0, 100, size=sum(entries)).astype(np.int32),
        target_logprobs=np.concatenate([lp[j, :n] for j, n in enumerate(entries)]),
        mc_samples=np.full(rows, 8, np.int32) if mc else None,
        mc_ess=rng.random(rows).astype(np.float32) * 8 if mc else None,
        mc_resamples=rng.integers(0, 3, size=rows).astype(np.int32) if mc else None,
        mc_resample_ess=rng.random(rows).astype(np.float32) * 4 if mc else None,
    )


@pytest.mark.parametrize("fmt", ["parquet", "safetensors"])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("mc", [False, True])
def test_roundtrip(tmp_path, fmt, dtype, mc):
    data = make_data(np.random.default_rng(0), mc=mc)
    path = tmp_path / f"x.{fmt}"
    write_shard(data, path, fmt, dtype)
    back = read_shard(path)
    assert back.example_ids == data.example_ids
    for name in [
        "input_ids",
        "prompt_len",
        "t",
        "mask_offsets",
        "mask_positions",
        "target_offsets",
        "target_positions",
        "entry_offsets",
        "target_ids",
    ]:
        np.testing.assert_array_equal(getattr(back, name), getattr(data, name), err_msg=name)
    tol = 1e-2 if dtype == "float16" else 0
    np.testing.assert_allclose(back.target_logprobs.astype(np.float32), data.target_logprobs, atol=tol, rtol=tol)
    if mc:
        for name in ("mc_samples", "mc_ess", "mc_resamples", "mc_resample_ess"):
            np.testing.assert_array_equal(getattr(back, name), getattr(data, name), err_msg=name)
    else:
        assert back.mc_samples is None and back.mc_resamples is None


def test_a_v1_shard_written_before_the_smc_columns_still_reads(tmp_path):
    """mc_resamples/mc_resample_ess were added within v1: a shard without them is read with them as None."""
    data = make_data(np.random.default_rng(3), mc=True)
    table = to_table(data, "float32").drop_columns(["mc_resamples", "mc_resample_ess"])
    pq.write_table(table, tmp_path / "old.parquet")
    back = read_shard(tmp_path / "old.parquet")
    np.testing.assert_array_equal(back.mc_ess, data.mc_ess)
    assert back.mc_resamples is None and back.mc_resample_ess is None
    table = to_table(data, "float32").drop_columns(["mc_ess"])  # a column v1 always had is still required
    pq.write_table(table, tmp_path / "bad.parquet")
    with pytest.raises(SchemaError, match="column mc_ess missing"):
        read_shard(tmp_path / "bad.parquet")


def test_float16_rounds_down_so_sums_stay_below_one():
    rng = np.random.default_rng(1)
    p = rng.dirichlet(np.ones(7), size=2000)
    h = to_float16_down(np.log(p).astype(np.float32))
    assert (h.astype(np.float64) <= np.log(p).astype(np.float32)).all()
    assert (np.exp(h.astype(np.float64)).sum(axis=1) <= 1 + 1e-7).all()


def test_parquet_columns_are_the_public_contract(tmp_path):
    data = make_data(np.random.default_rng(2))
    write_shard(data, tmp_path / "a.parquet", "parquet", "float16")
    t = pq.read_table(tmp_path / "a.parquet")
    assert t.schema.equals(shard_schema("float16"), check_metadata=True)
    row = t.slice(0, 1).to_pylist()[0]
    assert row["mask_positions"] == data.row_masks(0).tolist()
    assert len(row["target_ids"]) == len(row["mask_positions"])


def test_other_schema_version_is_refused(tmp_path):
    data = make_data(np.random.default_rng(3))
    table = to_table(data, "float32")
    table = table.replace_schema_metadata({b"ar2mdm.schema_version": b"2"})
    pq.write_table(table, tmp_path / "v2.parquet")
    with pytest.raises(SchemaError, match="schema version 2"):
        read_shard(tmp_path / "v2.parquet")
    pq.write_table(pa.table({"x": [1]}), tmp_path / "foreign.parquet")
    with pytest.raises(SchemaError, match="not an ar2mdm shard"):
        read_shard(tmp_path / "foreign.parquet")
    bad = table.replace_schema_metadata({b"ar2mdm.schema_version": b"1"}).drop_columns(["t"])
    pq.write_table(bad, tmp_path / "missing.parquet")
    with pytest.raises(SchemaError, match="column t missing"):
        read_shard(tmp_path / "missing.parquet")
