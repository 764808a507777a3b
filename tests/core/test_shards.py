"""The shard format: uint16 ids when the vocabulary fits, uint32 beyond, read back zero-copy."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from refit.stages.core.shards import read_shard, token_dtype, write_rows


@pytest.mark.parametrize(("vocab", "dtype"), [(300, pa.uint16()), (65536, pa.uint16()), (65537, pa.uint32())])
def test_ids_are_stored_in_the_smallest_type_that_holds_the_vocabulary(vocab, dtype):
    assert token_dtype(vocab) == dtype


def test_large_vocabulary_ids_round_trip_through_uint32_shards(tmp_path):
    ids = np.arange(0, 150_000, 7, dtype=np.int64)  # ids beyond 65535, as a 128k or 150k vocabulary has
    rows = write_rows(tmp_path / "shard.arrow", ids, 16, token_dtype(150_000), {"seq_len": "16"})
    assert rows == len(ids) // 16
    read = read_shard(tmp_path / "shard.arrow")
    assert read.dtype == np.uint32 and read.shape == (rows, 16)
    assert np.array_equal(read.reshape(-1), ids[: rows * 16]) and not read.flags.owndata  # zero-copy view
