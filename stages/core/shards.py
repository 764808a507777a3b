"""The shard format tokenize writes and training reads: an uncompressed Arrow IPC file with
one FixedSizeList column `tokens` of seq_len ids (uint16 when the vocabulary fits, else
uint32), memory-mappable, with the tokenizer hash, seq_len and source in its schema metadata."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa


def token_dtype(vocab_size: int) -> pa.DataType:
    return pa.uint16() if vocab_size <= 2**16 else pa.uint32()


def write_rows(out: Path, flat: np.ndarray, seq_len: int, dtype: pa.DataType, metadata: dict[str, str]) -> int:
    """Cut a token stream into rows of seq_len (dropping the tail) and write them as an
    uncompressed Arrow IPC file, atomically. Returns the number of rows."""
    rows = len(flat) // seq_len
    values = pa.array(flat[: rows * seq_len].astype(dtype.to_pandas_dtype()), type=dtype)
    column = pa.FixedSizeListArray.from_arrays(values, seq_len)
    schema = pa.schema([pa.field("tokens", column.type)], metadata=metadata)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(pa.table({"tokens": column}, schema=schema))
    os.replace(tmp, out)
    return rows


def read_shard(path: Path) -> np.ndarray:
    """A shard's rows as a (rows, seq_len) array viewing the memory-mapped file (zero-copy)."""
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
    column = reader.get_batch(0).column(0) if reader.num_record_batches else None
    if column is None or len(column) == 0:
        return np.zeros((0, int(reader.schema.metadata[b"seq_len"])), dtype=np.uint16)
    values = column.values.to_numpy(zero_copy_only=True)
    return values.reshape(len(column), -1)
