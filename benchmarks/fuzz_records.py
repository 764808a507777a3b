"""Fuzz curate's record reader, its file listing and the benchmark and probe loaders with the
generators and checks of tests/curate/test_records_fuzz.py, on many more examples than `make test` runs.

    python benchmarks/fuzz_records.py [--records 100000] [--round 500]

Generates JSONL files (every compression curate reads, whole, truncated or with bytes flipped)
until they hold --records records, plus Parquet files, folders of random names and kinds and
benchmark/probe files in proportion, in rounds of --round examples. Prints what was read (rows
by reason), the property violations and escaped exceptions (both must be 0; the first of each
kind is shown) and the time taken.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path[:0] = [str(TESTS), str(TESTS / "curate")]  # the generators and checks, and the conftest they import
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from test_records_fuzz import (  # noqa: E402
    LOADER_INPUTS,
    check_jsonl,
    check_listing,
    check_loader,
    check_parquet,
    folders,
    jsonl_files,
    lines_of,
    parquet_files,
)

FUZZ = settings(
    deadline=None, database=None, phases=[Phase.generate], suppress_health_check=list(HealthCheck), print_blob=False
)


class Tally:
    def __init__(self) -> None:
        self.counts: dict[str, Counter] = {}
        self.examples, self.failures, self.first = Counter(), Counter(), {}

    def run(self, target: str, check, *args) -> None:
        """One example: its rows counted, or its failure (a property violated, an exception escaped)."""
        self.examples[target] += 1
        try:
            self.counts.setdefault(target, Counter()).update(check(*args))
        except AssertionError as error:
            self._failed(target, "property violated", error, args)
        except Exception as error:
            self._failed(target, "exception escaped", error, args)

    def _failed(self, target: str, kind: str, error: BaseException, args: tuple) -> None:
        self.failures[target, kind] += 1
        self.first.setdefault((target, kind), f"{type(error).__name__}: {str(error)[:300]}\n    input: {args!r:.300}")


def fuzz_round(tally: Tally, folder: Path, examples: int, records: Counter) -> None:
    @given(file=jsonl_files())
    @settings(FUZZ, max_examples=examples)
    def jsonl(file):
        records["jsonl lines with a record"] += len(lines_of(file[1]))
        tally.run("jsonl", check_jsonl, folder, *file)

    @given(file=parquet_files())
    @settings(FUZZ, max_examples=max(examples // 5, 1))
    def parquet(file):
        records["parquet rows"] += len(file[0])
        tally.run("parquet", check_parquet, folder, *file)

    @given(entries=folders(), recursive=st.booleans())
    @settings(FUZZ, max_examples=max(examples // 10, 1))
    def listing(entries, recursive):
        tally.run("listing", check_listing, folder, entries, recursive)

    @given(**LOADER_INPUTS)
    @settings(FUZZ, max_examples=max(examples // 5, 1))
    def loaders(loader, before, suspect, after, gz):
        tally.run("loaders", lambda *args: Counter([check_loader(*args)]), folder, loader, before, suspect, after, gz)

    for target in (jsonl, parquet, listing, loaders):
        target()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=100_000, help="JSONL records to generate, at least")
    parser.add_argument("--round", type=int, default=500, help="JSONL files per Hypothesis run")
    args = parser.parse_args()
    tally, records, start = Tally(), Counter(), time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        while records["jsonl lines with a record"] < args.records:
            fuzz_round(tally, Path(tmp), args.round, records)
    seconds = time.perf_counter() - start
    print(f"generated: {', '.join(f'{n:,} {what}' for what, n in records.items())} in {seconds:.0f} s")
    for target, examples in tally.examples.items():
        counts = tally.counts.get(target, Counter())
        shown = ", ".join(f"{reason} {n:,}" for reason, n in counts.most_common())
        print(f"{target:8} {examples:6,} examples: {shown}")
    print(f"property violations: {sum(n for (_, kind), n in tally.failures.items() if kind == 'property violated')}")
    print(f"exceptions escaped: {sum(n for (_, kind), n in tally.failures.items() if kind == 'exception escaped')}")
    for (target, kind), first in tally.first.items():
        print(f"  first {kind} ({target}): {first}")
    sys.exit(1 if tally.failures else 0)


if __name__ == "__main__":
    main()
