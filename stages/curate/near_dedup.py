"""MinHash near-duplicate removal with datatrove, across sources and against earlier batches.

One datatrove pass (signatures, buckets, clusters) over the whole batch: every source's new
documents, given in priority order (legacy, then new, then qa; within a source, input
order). Datatrove finds the clusters of near-duplicates within the batch; `IndexLookup`,
in the same tasks as its bucket step, matches them against the MinHash index of every
earlier batch (`<index>/<batch>/bucket_BBB/*.minhash.index`, sorted signatures) by binary
search, so a batch reads only the parts of the index its own signatures fall in, not the
whole index as datatrove's merge would. Refit then keeps one member per cluster by priority:
the earliest document, unless the cluster touches an earlier batch, which always wins.
So when a new document near-duplicates a legacy one the legacy one is kept, the choice
does not depend on the number of workers, and a rerun costs only the new data.
The signatures come from Refit's vectorised step (stages/curate/minhash.py) unless
curate.minhash.signatures asks for datatrove's own.
"""

from __future__ import annotations

import json
import logging
import struct
from collections import defaultdict
from pathlib import Path

import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.dedup.minhash import (
    SENTINEL,
    MinhashConfig,
    MinhashDedupBuckets,
    MinhashDedupCluster,
    MinhashDedupSignature,
)
from datatrove.pipeline.readers import JsonlReader

from refit.stages.core.config import CurateSpec
from refit.stages.core.executors import Step, run_steps
from refit.stages.curate.minhash import FastMinhashSignature
from refit.stages.curate.steps import piece_positions

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


class IndexLookup(PipelineStep):
    """Task b of the bucket step, before datatrove's: every signature of bucket b that the
    MinHash index of an earlier batch holds becomes a pair (SENTINEL, SENTINEL, task, document)
    in `<output>/BBBBB_index.dups`, as datatrove's bucket step writes matches with its index.
    Each index file is memory-mapped and searched, never read whole."""

    type = "🫂 - DEDUP"
    name = "🔍 MinHash index lookup"

    def __init__(self, signatures: str, index: str, batch_name: str, output: str, config: MinhashConfig) -> None:
        super().__init__()
        self.signatures, self.index, self.output = Path(signatures), Path(index), Path(output)
        self.batch_name, self.config = batch_name, config

    def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> None:
        """Writes the matches of bucket `rank` and passes nothing on (datatrove's bucket step follows)."""
        hashes = np.dtype("<u4" if self.config.hash_config.precision == 32 else "<u8")
        key = np.dtype([(f"h{i}", hashes) for i in range(self.config.hashes_per_bucket)])  # compared in field order
        bucket = f"bucket_{rank:03d}"
        self.output.mkdir(parents=True, exist_ok=True)
        with open(self.output / f"{rank:05d}_index.dups", "wb") as out:
            files = sorted(self.index.glob(f"*/{bucket}/*.minhash.index"))
            earlier = [path for path in files if path.parts[-3] != self.batch_name]
            if not earlier:
                return
            record = np.dtype([("key", key), ("doc", "<u4")])
            for path in sorted((self.signatures / bucket).glob("*.minhash.sig")):
                new = np.fromfile(path, dtype=record)
                found = np.zeros(len(new), dtype=bool)
                for index_file in earlier:
                    if index_file.stat().st_size:
                        index = np.memmap(index_file, dtype=key, mode="r")
                        at = np.minimum(np.searchsorted(index, new["key"]), len(index) - 1)
                        found |= index[at] == new["key"]
                task = int(path.name.removesuffix(".minhash.sig"))
                for doc in new["doc"][found]:
                    out.write(struct.pack("<4I", SENTINEL, SENTINEL, task, int(doc)))
                    self.stat_update("index_match")


def near_dedup_feed(
    feed: list, tasks: int, work: Path, index: Path, batch_name: str, curate: CurateSpec
) -> dict[tuple[int, int], tuple[int, int] | int]:
    """Near-duplicates among the documents that the datatrove steps `feed` give each of `tasks`
    tasks (see curate_steps: task r's documents, in priority order, and their positions in
    `work/kept/RRRRR.positions`): {(task, index) removed: (task, index) kept}, the kept one
    being EARLIER_BATCH when the match is in an earlier batch's index. The feed and the three
    datatrove MinHash steps run on curate.executor with curate.workers tasks at once."""
    spec = curate.minhash
    config = MinhashConfig(n_grams=spec.ngram, num_buckets=spec.buckets, hashes_per_bucket=spec.hashes_per_bucket)
    signature_step = FastMinhashSignature if spec.signatures == "vectorised" else MinhashDedupSignature
    signatures = signature_step(output_folder=str(work / "signatures"), config=config)
    lookup = IndexLookup(str(work / "signatures"), str(index), batch_name, str(work / "buckets"), config)
    buckets = MinhashDedupBuckets(  # within the batch; writes the batch's own index, reads no other
        input_folder=str(work / "signatures"),
        output_folder=str(work / "buckets"),
        config=config,
        index_folder=str(index / batch_name),
        create_index_name=batch_name,
        only_dedup_in_index=False,
    )
    clusters = MinhashDedupCluster(
        input_folder=str(work / "buckets"), output_folder=str(work / "clusters"), config=config, save_cluster_id=True
    )
    run_steps(
        [
            Step("signatures", [*feed, signatures], tasks),
            Step("buckets", [lookup, buckets], config.num_buckets),
            Step("clusters", [clusters], 1),
        ],
        curate,
        work / "logs",
    )
    positions = [piece_positions(work, rank) for rank in range(tasks)]

    def priority(member: tuple[int, int]) -> tuple[int, int]:
        rank, doc = member  # a task's pieces of one document are in order; positions are unique
        return (EARLIER_BATCH, 0) if rank == SENTINEL else (int(positions[rank][doc]), doc)

    removed: dict[tuple[int, int], tuple[int, int] | int] = {}
    for members in _clusters(work / "clusters").values():
        ordered = sorted(members, key=priority)
        keep = EARLIER_BATCH if ordered[0][0] == SENTINEL else ordered[0]
        removed.update({member: keep for member in ordered[1:]})
    log.info("%s: MinHash removed %d of %d documents", batch_name, len(removed), sum(map(len, positions)))
    return removed


def near_dedup(docs: list[str], work: Path, index: Path, batch_name: str, curate: CurateSpec) -> dict[int, int]:
    """`near_dedup_feed` over a list of texts in priority order: {removed position: kept
    position} (EARLIER_BATCH for a match in an earlier batch's index)."""
    if not docs:
        return {}
    tasks = max(1, min(curate.workers, len(docs)))
    (work / "input").mkdir(parents=True)
    (work / "kept").mkdir()
    for rank in range(tasks):  # task r reads file r: positions r, r + tasks, ...
        with open(work / "input" / f"{rank:05d}.jsonl", "w", encoding="utf-8") as out:
            for position in range(rank, len(docs), tasks):
                out.write(json.dumps({"id": str(position), "text": docs[position]}) + "\n")
        np.arange(rank, len(docs), tasks, dtype="<i8").tofile(work / "kept" / f"{rank:05d}.positions")
    reader = JsonlReader(str(work / "input"), glob_pattern="*.jsonl", compression=None)
    removed = near_dedup_feed([reader], tasks, work, index, batch_name, curate)

    def position(member: tuple[int, int] | int) -> int:
        return EARLIER_BATCH if member == EARLIER_BATCH else member[0] + member[1] * tasks

    return {position(member): position(kept) for member, kept in removed.items()}
