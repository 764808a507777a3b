"""tokenize tokens/s against bare batch encoding with the same tokenizer, in one run.

    python benchmarks/bench_tokenize.py [--copies 4] [--workers 2]

Input: the demo's curated documents (curated here first), repeated --copies times so the
run is long enough to time. Baseline: the same fast tokenizer's batch encoding of the same
texts in one process, with its own Rust thread pool (TOKENIZERS_PARALLELISM on), output
discarded. Refit: refit.stages.tokenize.stage.run_tokenize with --workers processes, including packing
and writing the Arrow shards. Prints tokens/s and the ratio (target: Refit >= 0.8x).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pyarrow.parquet as pq  # noqa: E402

from refit.stages.core.config import load_recipe  # noqa: E402
from refit.stages.curate.stage import curated_files, run_curate  # noqa: E402
from refit.stages.tokenize.stage import load_tokenizer, run_tokenize, tokenizer_dir  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "deployments" / "demo.yaml"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    recipe = load_recipe(RECIPE)
    recipe = recipe.model_copy(update={"tokenize": recipe.tokenize.model_copy(update={"workers": args.workers})})
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        run_curate(recipe, workdir)
        for source in recipe.sources:  # repeat the curated batch: more text, same documents
            (train,) = curated_files(workdir, source.name, "train")
            table = pq.read_table(train)
            for copy in range(1, args.copies):
                pq.write_table(table, train.with_name(f"train-{copy + 1:04d}.parquet"))
        texts = [
            t
            for s in recipe.sources
            for f in curated_files(workdir, s.name, "train")
            for t in pq.read_table(f)["text"].to_pylist()
        ]

        os.environ["TOKENIZERS_PARALLELISM"] = "true"
        tokenizer = load_tokenizer(tokenizer_dir(recipe))
        start = time.perf_counter()
        tokens = 0
        for first in range(0, len(texts), recipe.tokenize.batch_size):
            tokens += sum(len(ids) for ids in tokenizer(texts[first : first + recipe.tokenize.batch_size])["input_ids"])
        baseline = time.perf_counter() - start

        start = time.perf_counter()
        report = run_tokenize(recipe, workdir, force=True)
        ours = time.perf_counter() - start
    packed = sum(s["tokens"] for s in report["sources"].values())
    print(f"input: {len(texts):,} documents, {tokens:,} tokens ({packed:,} packed into rows)")
    print(f"baseline batch encoding      {tokens / baseline / 1e6:6.2f} M tokens/s")
    print(f"refit tokenize ({args.workers} workers)    {tokens / ours / 1e6:6.2f} M tokens/s (Arrow shards written)")
    print(f"ratio refit/baseline: {baseline / ours:.2f}x (target >= 0.8x)")


if __name__ == "__main__":
    main()
