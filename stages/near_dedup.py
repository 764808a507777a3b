"""MinHash near-duplicate removal with datatrove, against everything curated before.

Each call dedupes one batch of one source: the batch's documents are compared with each
other and with the MinHash index of every earlier batch (earlier runs, and sources curated
earlier in this run: legacy before new before qa), then the batch's own signatures join
the index. A document matching the index is the one removed, so when a new document
near-duplicates a legacy one the legacy one is kept, and a rerun costs only the new data.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from datatrove.executor import LocalPipelineExecutor
from datatrove.pipeline.dedup.minhash import (
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupFilter,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from stages.config import MinHashSpec

log = logging.getLogger(__name__)


def _run(pipeline: list, tasks: int, workers: int, logs: Path) -> None:
    # fork, not datatrove's default forkserver: workers then start without re-importing
    # datatrove and spaCy, which costs more than the work itself on small batches
    LocalPipelineExecutor(pipeline=pipeline, tasks=tasks, workers=min(workers, tasks), logging_dir=str(logs),
                          skip_completed=False, start_method="fork").run()


def near_dedup(docs: list[tuple[str, str]], work: Path, index: Path, batch_name: str,
               spec: MinHashSpec, workers: int) -> tuple[list[tuple[str, str]], list[str]]:
    """Split (id, text) docs into (kept docs in input order, ids removed as near-duplicates)."""
    if not docs:
        return [], []
    config = MinhashConfig(n_grams=spec.ngram, num_buckets=spec.buckets, hashes_per_bucket=spec.hashes_per_bucket)
    inputs = work / "input"
    inputs.mkdir(parents=True)
    tasks = max(1, min(workers, len(docs)))
    for rank in range(tasks):  # one input file per task: the doc index of the filter is per task
        with open(inputs / f"{rank:05d}.jsonl", "w", encoding="utf-8") as out:
            for doc_id, text in docs[rank::tasks]:
                out.write(json.dumps({"id": doc_id, "text": text}) + "\n")

    def reader() -> JsonlReader:
        return JsonlReader(str(inputs), glob_pattern="*.jsonl", compression=None)

    _run([reader(), MinhashDedupSignature(output_folder=str(work / "signatures"), config=config)], tasks, workers, work / "logs/1")
    _run([MinhashDedupBuckets(input_folder=str(work / "signatures"), output_folder=str(work / "buckets"), config=config,
                              index_folder=str(index), create_index_name=batch_name, only_dedup_in_index=False)],
         config.num_buckets, workers, work / "logs/2")
    _run([MinhashDedupCluster(input_folder=str(work / "buckets"), output_folder=str(work / "remove"), config=config)],
         1, 1, work / "logs/3")
    _run([reader(),
          MinhashDedupFilter(input_folder=str(work / "remove"),
                             exclusion_writer=JsonlWriter(str(work / "removed"), output_filename="${rank}.jsonl", compression=None)),
          JsonlWriter(str(work / "kept"), output_filename="${rank}.jsonl", compression=None)], tasks, workers, work / "logs/4")
    kept_ids = {json.loads(line)["id"] for path in (work / "kept").glob("*.jsonl") for line in open(path, encoding="utf-8")}
    kept = [doc for doc in docs if doc[0] in kept_ids]
    removed = [doc_id for doc_id, _ in docs if doc_id not in kept_ids]
    log.info("%s: MinHash removed %d of %d documents", batch_name, len(removed), len(docs))
    return kept, removed
