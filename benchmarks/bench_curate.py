"""curate throughput against the bare datatrove MinHash pipeline on the same input.

    python benchmarks/bench_curate.py [--workers 2] [--repeat 2]

Input: the demo corpora (deployments/demo.yaml's sources). Both sides use datatrove's
4-step MinHash dedupe (signatures, buckets, clusters, filter) with the recipe's settings
and the same number of workers; Refit also validates every record, normalises, removes
exact duplicates, decontaminates against the benchmarks, splits off validation documents
and writes Parquet, quarantine and reports, one source at a time so that legacy wins ties.
Prints MB/s of input text for each and the ratio (target: Refit >= 0.9x the baseline).
"""

from __future__ import annotations

import argparse
import gzip
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("LOGURU_LEVEL", "WARNING")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from datatrove.executor import LocalPipelineExecutor  # noqa: E402
from datatrove.pipeline.dedup.minhash import (  # noqa: E402
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader  # noqa: E402
from datatrove.pipeline.writers import JsonlWriter  # noqa: E402

from refit.stages.core.config import load_recipe  # noqa: E402
from refit.stages.curate.stage import run_curate, source_files  # noqa: E402

RECIPE = Path(__file__).resolve().parent.parent / "deployments" / "demo.yaml"


def bare_datatrove(files: list[Path], work: Path, workers: int, spec) -> None:
    """The pipeline as datatrove's own MinHash example runs it (default executor settings)."""
    config = MinhashConfig(n_grams=spec.ngram, num_buckets=spec.buckets, hashes_per_bucket=spec.hashes_per_bucket)
    inputs = work / "input"
    inputs.mkdir(parents=True)
    for f in files:
        os.symlink(f, inputs / f.name)
    tasks = len(files)

    def run(pipeline, n_tasks, logs):
        LocalPipelineExecutor(
            pipeline=pipeline, tasks=n_tasks, workers=min(workers, n_tasks), logging_dir=str(work / logs)
        ).run()

    run([JsonlReader(str(inputs)), MinhashDedupSignature(output_folder=str(work / "sigs"), config=config)], tasks, "l1")
    run(
        [MinhashDedupBuckets(input_folder=str(work / "sigs"), output_folder=str(work / "buckets"), config=config)],
        config.num_buckets,
        "l2",
    )
    run(
        [MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
        1,
        "l3",
    )
    run(
        [
            JsonlReader(str(inputs)),
            MinhashDedupFilter(input_folder=str(work / "remove")),
            JsonlWriter(str(work / "out")),
        ],
        tasks,
        "l4",
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each; the best is kept")
    args = parser.parse_args()
    recipe = load_recipe(RECIPE, check_files=False)
    recipe = recipe.model_copy(update={"curate": recipe.curate.model_copy(update={"workers": args.workers})})
    files = [f for s in recipe.sources for f in source_files(s)[0]]
    megabytes = sum(len(gzip.open(f).read()) for f in files) / 1e6
    best = {"baseline": float("inf"), "refit": float("inf")}
    for _ in range(args.repeat):
        for name in best:
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                if name == "baseline":
                    bare_datatrove(files, Path(tmp), args.workers, recipe.curate.minhash)
                else:
                    run_curate(recipe, Path(tmp), force=True)
                best[name] = min(best[name], time.perf_counter() - start)
    print(f"input: {len(files)} files, {megabytes:.2f} MB of JSONL text; workers {args.workers}; best of {args.repeat}")
    for name, seconds in best.items():
        print(f"{name:<9} {seconds:6.1f} s   {megabytes / seconds:6.3f} MB/s")
    print(f"ratio refit/baseline throughput: {best['baseline'] / best['refit']:.2f}x (target >= 0.9x)")


if __name__ == "__main__":
    main()
