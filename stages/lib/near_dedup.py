"""MinHash near-duplicate removal with datatrove, across sources and against earlier batches.

One datatrove pass (signatures, buckets, clusters) over the whole batch: every source's new
documents, given in priority order (legacy, then new, then qa; within a source, input
order). Datatrove finds the clusters of near-duplicates, matching them also against the
MinHash index of every earlier batch; Refit then keeps one member per cluster by priority:
the earliest document, unless the cluster touches an earlier batch, which always wins.
So when a new document near-duplicates a legacy one the legacy one is kept, the choice
does not depend on the number of workers, and a rerun costs only the new data.
The signatures come from Refit's vectorised step (stages/lib/minhash.py) unless
curate.minhash.signatures asks for datatrove's own.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import defaultdict
from pathlib import Path

from datatrove.pipeline.dedup.minhash import (
    SENTINEL,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader

from refit.stages.lib.config import CurateSpec
from refit.stages.lib.executors import Step, run_steps
from refit.stages.lib.minhash import FastMinhashSignature

log = logging.getLogger(__name__)
EARLIER_BATCH = -1  # priority of a cluster member that lives in the index of an earlier batch


def _clusters(folder: Path) -> dict[int, list[tuple[int, int]]]:
    """cluster id -> members as (signature file = task rank, document index in that task)."""
    members: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for path in folder.glob("*.clusters"):
        data = path.read_bytes()
        for doc, cluster in struct.iter_unpack("<2I", data):
            members[cluster].append((int(path.stem), doc))
    return members


def near_dedup(docs: list[str], work: Path, index: Path, batch_name: str, curate: CurateSpec) -> dict[int, int]:
    """Near-duplicates among docs (texts, in priority order): {removed position: kept position},
    the kept position being EARLIER_BATCH when the match is in an earlier batch's index. The
    three datatrove steps run on curate.executor with curate.workers tasks at once."""
    if not docs:
        return {}
    spec = curate.minhash
    config = MinhashConfig(n_grams=spec.ngram, num_buckets=spec.buckets, hashes_per_bucket=spec.hashes_per_bucket)
    signature_step = FastMinhashSignature if spec.signatures == "vectorised" else MinhashDedupSignature
    inputs = work / "input"
    inputs.mkdir(parents=True)
    tasks = max(1, min(curate.workers, len(docs)))
    for rank in range(tasks):  # task r reads file r; position = rank + doc_index * tasks
        with open(inputs / f"{rank:05d}.jsonl", "w", encoding="utf-8") as out:
            for position in range(rank, len(docs), tasks):
                out.write(json.dumps({"id": str(position), "text": docs[position]}) + "\n")
    reader = JsonlReader(str(inputs), glob_pattern="*.jsonl", compression=None)
    signatures = signature_step(output_folder=str(work / "signatures"), config=config)
    buckets = MinhashDedupBuckets(
        input_folder=str(work / "signatures"),
        output_folder=str(work / "buckets"),
        config=config,
        index_folder=str(index),
        create_index_name=batch_name,
        only_dedup_in_index=False,
    )
    clusters = MinhashDedupCluster(
        input_folder=str(work / "buckets"), output_folder=str(work / "clusters"), config=config, save_cluster_id=True
    )
    run_steps(
        [
            Step("signatures", [reader, signatures], tasks),
            Step("buckets", [buckets], config.num_buckets),
            Step("clusters", [clusters], 1),
        ],
        curate,
        work / "logs",
    )
    removed: dict[int, int] = {}
    for members in _clusters(work / "clusters").values():
        positions = sorted(EARLIER_BATCH if rank == SENTINEL else rank + doc * tasks for rank, doc in members)
        keep = positions[0]
        removed.update({position: keep for position in positions[1:]})
    log.info("%s: MinHash removed %d of %d documents", batch_name, len(removed), len(docs))
    return removed
