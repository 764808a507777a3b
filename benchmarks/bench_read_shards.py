"""Reading packed sequences from a tokenize shard: throughput and memory, against numpy.

    python benchmarks/bench_read_shards.py [--tokens 200e6] [--seq-len 512] [--batch 64]

Writes one shard with the tokenize stage's writer, warms the page cache, then reads every
row in batches (summing each batch, so every byte is touched) two ways in the same run:
  baseline  numpy.memmap over the raw bytes of the same data (no Arrow at all)
  refit     refit.stages.core.shards.read_shard (pyarrow.memory_map, zero-copy view)
Prints tokens/s of each, their ratio, and resident-memory growth against bytes touched.
Target (issue 3): >= 50M tokens/s, zero-copy, memory growth not above the bytes touched.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from refit.stages.core.shards import read_shard, write_rows  # noqa: E402


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def scan(rows: np.ndarray, batch: int) -> tuple[float, int]:
    start, checksum = time.perf_counter(), 0
    for first in range(0, len(rows), batch):
        checksum += int(rows[first : first + batch].sum(dtype=np.uint64))
    return time.perf_counter() - start, checksum


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, default=200e6)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        shard, raw = Path(tmp) / "shard-00000.arrow", Path(tmp) / "raw.u16"
        flat = np.random.default_rng(0).integers(0, 4096, int(args.tokens), dtype=np.uint16)
        rows = write_rows(shard, flat, args.seq_len, pa.uint16(), {"seq_len": str(args.seq_len)})
        flat[: rows * args.seq_len].tofile(raw)
        del flat
        for path in (shard, raw):
            path.read_bytes()  # warm the page cache
        tokens = rows * args.seq_len

        baseline_rows = np.memmap(raw, dtype=np.uint16, mode="r").reshape(rows, args.seq_len)
        scan(baseline_rows, args.batch)
        base_s, base_sum = scan(baseline_rows, args.batch)

        before = rss_bytes()
        shard_rows = read_shard(shard)
        zero_copy = not shard_rows.flags.owndata and not shard_rows.flags.writeable
        ours_s, ours_sum = scan(shard_rows, args.batch)
        growth = rss_bytes() - before
        assert ours_sum == base_sum, "read_shard returned different tokens"

        print(f"tokens {tokens:,} ({tokens * 2 / 2**20:.0f} MiB), seq_len {args.seq_len}, batch {args.batch}")
        print(f"baseline numpy.memmap     {tokens / base_s / 1e6:8.1f} M tokens/s")
        print(
            f"refit read_shard          {tokens / ours_s / 1e6:8.1f} M tokens/s   "
            f"ratio {base_s / ours_s:.2f}x  (target >= 50 M tokens/s)"
        )
        print(
            f"zero-copy view: {zero_copy}; RSS growth {growth / 2**20:.0f} MiB "
            f"for {tokens * 2 / 2**20:.0f} MiB touched "
            f"(ratio {growth / (tokens * 2):.2f}, target <= 1)"
        )


if __name__ == "__main__":
    main()
