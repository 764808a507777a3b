"""Curate's streaming parts: a batch's clean documents go through files, never a list in memory.

1. `ReadRecords`, a datatrove PipelineStep on curate.executor: each task reads its share of
   the batch's files and validates every record (records.py), writing per file its
   quarantined records, its clean documents, their text hashes, and the id of every record
   that has one, good or bad (`work/read/FFFFF.*`).
2. `find_duplicate_ids`: one DuckDB query over those ids and the id index of every earlier
   batch (`id-index/*.parquet`) decides the claims: the first record with an id (by batch,
   then source, file and line) claims it, even when it was itself bad; every later good
   record with that id is a duplicate_id naming it.
3. `deal` (curate.py) reads the files' outputs back in priority order, quarantines the
   duplicate ids and deals each clean document round robin into curate.workers spool files
   (`work/clean/RRRRR.jsonl`, datatrove's JSONL layout; see `task_of`), a new round of
   files every DOCS_PER_ROUND documents, so that no task's share grows with the batch, and
   the sha256 of its text into a Parquet spool of (hash, position, name).
4. `find_exact_duplicates`: one DuckDB query over that spool and the exact index of every
   earlier batch and explicit validation file (`exact-index/*.parquet`, one file of first
   occurrences each) finds every document whose text was seen before, naming the first one.
   DuckDB's hash aggregate and join work in a database file and spill to disk past
   DUCKDB_MEMORY, so memory does not grow with the batch. The result goes to one file per
   task, in position order.
5. `CleanDocuments`, a datatrove PipelineStep run in the same tasks as the MinHash signature
   step on curate.executor: each task drops its exact duplicates, decontaminates the rest,
   writes the removed documents with their reasons (`work/removed/RRRRR.jsonl`) and the
   pieces kept (`work/kept/RRRRR.jsonl`, their positions in `RRRRR.positions`), and passes
   the pieces on to the signatures, one at a time.
6. `merged` reads the tasks' files back in position order for the Parquet writer.
Decisions depend on file order and positions only, so not on the executor or the number of tasks.
"""

from __future__ import annotations

import contextlib
import hashlib
import heapq
import json
import struct
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from refit.stages.core.config import CurateSpec, SourceSpec
from refit.stages.core.text import WORD, benchmark_ngrams
from refit.stages.curate.records import Record, read_records

DUCKDB_MEMORY = "64MB"  # beyond this DuckDB spills to disk (at 512MB its peak grew with the batch)
PARTITION_ROWS = 1 << 17  # texts per partition of the exact dedupe's aggregate and joins
DOCS_PER_ROUND = 65536  # documents dealt into one round of curate.workers spool files
ROWS_PER_GROUP = 2048  # rows of a curated Parquet row group (or fewer: MAX_GROUP_CHARS)
MAX_GROUP_CHARS = 32 << 20  # characters buffered before a row group is written
HASH_SCHEMA = pa.schema([("hash", pa.binary()), ("position", pa.int64()), ("name", pa.string())])
POSITION = struct.Struct("<q")
# per file read: the id of each record that has one (a split record once), good (reason null) or bad
ID_SCHEMA = pa.schema(
    [("source", pa.string()), ("id", pa.string()), ("file", pa.int64()), ("line", pa.int64()), ("reason", pa.string())]
)
# per file read: each clean document's line, text hash, "source:doc_id" and length
DOCS_SCHEMA = pa.schema([("line", pa.int64()), ("hash", pa.binary()), ("name", pa.string()), ("chars", pa.int64())])


class RowGroupWriter:
    """A Parquet file written as rows arrive, a row group at a time: memory holds one group."""

    def __init__(self, path: Path, schema: pa.Schema, rows_per_group: int = 65536) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.schema, self.rows_per_group = schema, rows_per_group
        self.sink = open(path, "wb")  # ours to release even when the writer cannot close (a full disk)
        self.writer = pq.ParquetWriter(self.sink, schema)
        self.columns: list[list] = [[] for _ in schema]
        self.rows = self.chars = self.buffered_chars = 0

    def add(self, *row, chars: int = 0) -> None:
        """One row; chars: its size in characters (rows are written before MAX_GROUP_CHARS are buffered)."""
        for column, value in zip(self.columns, row, strict=True):
            column.append(value)
        self.rows += 1
        self.chars += chars
        self.buffered_chars += chars
        if len(self.columns[0]) >= self.rows_per_group or self.buffered_chars >= MAX_GROUP_CHARS:
            self._flush()

    def _flush(self) -> None:
        if self.columns[0]:
            self.writer.write_table(pa.table(self.columns, schema=self.schema))
            self.columns, self.buffered_chars = [[] for _ in self.schema], 0

    def close(self) -> None:
        try:
            self._flush()
            self.writer.close()
        finally:  # released even when the last group cannot be written (a full disk)
            self.sink.close()

    def __enter__(self) -> RowGroupWriter:
        return self

    def __exit__(self, error_type, error, traceback) -> None:
        if error_type is None:
            self.close()
        else:  # the file is thrown away: only released
            with contextlib.suppress(Exception):
                self.writer.close()
            with contextlib.suppress(OSError):
                self.sink.close()


class LazyJsonl:
    """A JSONL file created at its first row (no empty files)."""

    def __init__(self, path: Path) -> None:
        self.path, self.handle, self.rows = path, None, 0

    def write(self, row: dict) -> None:
        self.write_line(json.dumps(row, ensure_ascii=False) + "\n")

    def write_line(self, line: str) -> None:
        """A row already written as JSON (ending with a newline)."""
        if self.handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.handle = open(self.path, "w", encoding="utf-8")
        self.handle.write(line)
        self.rows += 1

    def close(self) -> None:
        if self.handle is not None:
            self.handle.close()


def task_of(position: int, workers: int) -> int:
    """The spool file, and datatrove task, of the document at `position`: round robin over
    `workers` files, a new round of files every DOCS_PER_ROUND documents."""
    width = min(workers, DOCS_PER_ROUND)
    round_, place = divmod(position, DOCS_PER_ROUND)
    return round_ * width + place % width


class Spool:
    """The clean documents of a batch in priority order, dealt into JSONL files that
    datatrove's JsonlReader reads (task r reads file r; see `task_of`), their text hashes
    into a Parquet spool for the exact dedupe."""

    def __init__(self, work: Path, workers: int) -> None:
        self.folder = work / "clean"
        self.folder.mkdir(parents=True)
        self.workers = workers
        self.files: list = []
        self.count = 0
        self.hashes = RowGroupWriter(work / "exact" / "hashes.parquet", HASH_SCHEMA)

    def add(self, row_tail: str, hash_: bytes, name: str) -> None:
        """One document: row_tail is its JSON row after the id (see `document_row_tail`)."""
        rank = task_of(self.count, self.workers)
        if rank == len(self.files):  # files are opened in rank order
            self.files.append(open(self.folder / f"{rank:05d}.jsonl", "w", encoding="utf-8"))
        self.files[rank].write(f'{{"id": "{self.count}", {row_tail}')
        self.hashes.add(hash_, self.count, name)
        self.count += 1

    def close(self) -> int:
        """Close the files; returns how many there are (the number of tasks)."""
        for handle in self.files:
            handle.close()
        self.hashes.close()
        return len(self.files)


def parquet_rows(path: Path, batch_size: int = 4096) -> Iterator[tuple]:
    """The rows of a Parquet file as tuples, a record batch at a time; none when there is no file."""
    if not path.exists():
        return
    for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
        yield from zip(*(column.to_pylist() for column in batch.columns), strict=True)


def text_hash(text: str) -> bytes:
    return hashlib.sha256(text.encode()).digest()


def quoted(path: Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def duckdb_connection(database: Path, threads: int):
    import duckdb

    db = duckdb.connect(str(database))
    db.execute(f"SET memory_limit='{DUCKDB_MEMORY}'")
    db.execute(f"SET temp_directory={quoted(database.with_suffix('.spill'))}")
    db.execute(f"SET threads={threads}")
    return db


def _earlier(index: Path) -> str:
    files = sorted(index.glob("*.parquet"))
    if not files:
        return "SELECT NULL::BLOB AS hash, NULL::VARCHAR AS name WHERE false"
    return f"SELECT hash, name FROM read_parquet([{', '.join(map(quoted, files))}])"


def index_first_occurrences(hashes: Path, index_file: Path, work: Path) -> None:
    """The exact index of a set of texts (hashes: a HASH_SCHEMA spool): each hash once, with
    the name of its first occurrence."""
    index_file.parent.mkdir(parents=True, exist_ok=True)
    with closing(duckdb_connection(work / "index.duckdb", 1)) as db:
        db.execute(
            f"COPY (SELECT hash, arg_min(name, position) AS name FROM read_parquet({quoted(hashes)}) "
            f"GROUP BY hash ORDER BY min(position)) TO {quoted(index_file)} (FORMAT parquet)"
        )


def find_exact_duplicates(work: Path, index: Path, batch_name: str, tasks: int, workers: int) -> int:
    """Write, for each of the spool's `tasks` (dealt over `workers`), `work/exact/RRRRR.jsonl`:
    [position, name of the first document with that text] of each of its documents whose text
    came before (earlier in this batch, or in the exact index), in position order. The batch's
    first occurrences of new texts become `index/<batch_name>.parquet`. Returns the number of
    duplicates."""
    index.mkdir(parents=True, exist_ok=True)
    spool = quoted(work / "exact" / "hashes.parquet")
    outputs = [open(work / "exact" / f"{rank:05d}.jsonl", "w", encoding="utf-8") for rank in range(tasks)]
    count = 0
    with closing(duckdb_connection(work / "exact" / "dedupe.duckdb", workers)) as db:
        db.execute(f"CREATE VIEW new AS SELECT * FROM read_parquet({spool})")
        db.execute(f"CREATE VIEW earlier AS {_earlier(index)}")
        # hash-partitioned, each partition's aggregate and joins at most PARTITION_ROWS texts: one
        # aggregate over 1.7M texts could not get its hash table within DUCKDB_MEMORY
        db.execute("CREATE TABLE claims (hash BLOB, position BIGINT, earlier BOOLEAN, name VARCHAR)")
        db.execute("CREATE TABLE duplicates (position BIGINT, name VARCHAR)")
        parts = -(-pq.ParquetFile(work / "exact" / "hashes.parquet").metadata.num_rows // PARTITION_ROWS) or 1
        for part in range(parts):
            where = f"WHERE hash(hash) % {parts} = {part}"
            db.execute(
                f"CREATE OR REPLACE TABLE firsts AS SELECT hash, min(position) AS position FROM new {where} "
                "GROUP BY hash"
            )
            db.execute("CREATE OR REPLACE TABLE named AS SELECT f.*, n.name FROM firsts f JOIN new n USING (position)")
            db.execute(  # each text's first occurrence: in an earlier batch, else in this one
                "CREATE OR REPLACE TABLE part_claims AS SELECT f.hash, f.position, e.hash IS NOT NULL AS earlier, "
                f"coalesce(e.name, f.name) AS name FROM named f LEFT JOIN (SELECT * FROM earlier {where}) e "
                "ON e.hash = f.hash"
            )
            db.execute("INSERT INTO claims SELECT * FROM part_claims")
            db.execute(
                f"INSERT INTO duplicates SELECT n.position, c.name FROM (SELECT * FROM new {where}) n "
                "JOIN part_claims c USING (hash) WHERE c.earlier OR n.position <> c.position"
            )
        found = work / "exact" / "duplicates.parquet"
        db.execute(f"COPY (SELECT * FROM duplicates ORDER BY position) TO {quoted(found)} (FORMAT parquet)")
        for position, name in parquet_rows(found, batch_size=65536):
            outputs[task_of(position, workers)].write(json.dumps([position, name], ensure_ascii=False) + "\n")
            count += 1
        db.execute("SET threads=1")  # one writer thread: the same bytes whatever curate.workers is
        db.execute(
            "COPY (SELECT hash, name FROM claims WHERE NOT earlier ORDER BY position) "
            f"TO {quoted(index / f'{batch_name}.parquet')} (FORMAT parquet)"
        )
    for handle in outputs:
        handle.close()
    return count


def document_row_tail(source: str, doc_id: str, text: str) -> str:
    """A clean document's spool row (datatrove JSONL: id, text, metadata) without its leading
    `{"id": "<position>", `: positions are given only when the batch is dealt."""
    return json.dumps({"text": text, "source": source, "doc": doc_id}, ensure_ascii=False)[1:] + "\n"


def read_file(folder: Path, order: int, source: SourceSpec, path: str, spec: CurateSpec) -> None:
    """Read and validate one file of the batch (`order`: its place in the batch) into
    folder/FFFFF.*: .quarantine.jsonl (bad records, in line order), .docs (clean documents,
    `document_row_tail`), .parquet (DOCS_SCHEMA, a row per document), .ids.parquet
    (ID_SCHEMA) and .counts.json, written last."""
    name = folder / f"{order:05d}"
    counts: Counter[str] = Counter()
    with (
        RowGroupWriter(name.with_suffix(".ids.parquet"), ID_SCHEMA) as ids,
        RowGroupWriter(name.with_suffix(".parquet"), DOCS_SCHEMA) as docs,
        open(name.with_suffix(".docs"), "w", encoding="utf-8") as texts,
        open(name.with_suffix(".quarantine.jsonl"), "w", encoding="utf-8") as quarantined,
    ):
        for record in read_records(Path(path), source, spec):
            counts["records"] += 1  # an unreadable file counts as one bad record
            if record.part is not None:
                counts["split_parts"] += 1
            if record.id is not None and not record.part:  # a split record claims its id once
                ids.add(source.name, record.id, order, record.line, record.reason)
            if record.reason is not None:
                counts[f"quarantined:{record.reason}"] += 1
                quarantined.write(json.dumps(record.quarantine_row(source.name), ensure_ascii=False) + "\n")
                continue
            texts.write(document_row_tail(source.name, record.doc_id, record.text))
            docs.add(record.line, text_hash(record.text), f"{source.name}:{record.doc_id}", len(record.text))
    name.with_suffix(".counts.json").write_text(json.dumps(counts))


class ReadRecords(PipelineStep):
    """Task r of the reading step: files r, r + world_size, ... of the batch, each read and
    validated into its own outputs (`read_file`), so what is written does not depend on the
    number of tasks."""

    type = "📖 - READER"
    name = "🔎 read and validate"

    def __init__(self, folder: str, files: list[tuple[SourceSpec, str]], spec: CurateSpec) -> None:
        super().__init__()
        self.folder, self.files, self.spec = Path(folder), files, spec

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> None:
        """Writes files and passes no documents on (the batch is dealt once every file is read)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for order in range(rank, len(self.files), world_size):
            source, path = self.files[order]
            read_file(self.folder, order, source, path, self.spec)
            self.stat_update("files")


def _earlier_ids(index: Path) -> str:
    files = sorted(index.glob("*.parquet"))
    if not files:
        return (
            "SELECT NULL::VARCHAR AS source, NULL::VARCHAR AS id, NULL::VARCHAR AS path, NULL::BIGINT AS line, "
            "NULL::VARCHAR AS reason WHERE false"
        )
    return f"SELECT source, id, path, line, reason FROM read_parquet([{', '.join(map(quoted, files))}])"


def find_duplicate_ids(folder: Path, index: Path, batch_name: str, paths: list[str], threads: int) -> None:
    """Decide the id claims of the batch's files (`paths`, in batch order) read into `folder`:
    writes folder/duplicate-ids.parquet, (file, line, id, path, first_line, reason) of every good
    record whose id an earlier record claimed (the last three: the claiming record, reason null
    when it was good), in file and line order; and index/<batch_name>.parquet, the batch's new claims.
    Records are compared by key = file << 32 | line; the hash aggregate (a plain min: arg_min
    does not spill) and the joins spill to disk past DUCKDB_MEMORY."""
    index.mkdir(parents=True, exist_ok=True)
    spool = ", ".join(quoted(folder / f"{order:05d}.ids.parquet") for order in range(len(paths)))
    with closing(duckdb_connection(folder / "claims.duckdb", threads)) as db:
        db.execute("CREATE TABLE paths (file BIGINT, path VARCHAR)")
        db.executemany("INSERT INTO paths VALUES (?, ?)", list(enumerate(paths)))
        db.execute(
            f"CREATE VIEW new AS SELECT source, id, (file << 32) + line AS key, reason FROM read_parquet([{spool}])"
        )
        db.execute(f"CREATE VIEW earlier AS {_earlier_ids(index)}")
        db.execute("CREATE TABLE firsts AS SELECT source, id, min(key) AS key FROM new GROUP BY source, id")
        db.execute("CREATE TABLE bad AS SELECT source, id, key, reason FROM new WHERE reason IS NOT NULL")
        db.execute(  # each id's claim: by an earlier batch's record, else by this batch's first (reason null: good)
            "CREATE TABLE claims AS SELECT f.source, f.id, f.key, e.id IS NOT NULL AS earlier, "
            "coalesce(e.path, p.path) AS path, coalesce(e.line, f.key & 4294967295) AS line, "
            "CASE WHEN e.id IS NULL THEN b.reason ELSE e.reason END AS reason "
            "FROM firsts f LEFT JOIN earlier e USING (source, id) JOIN paths p ON p.file = f.key >> 32 "
            "LEFT JOIN bad b ON b.source = f.source AND b.id = f.id AND b.key = f.key"
        )
        db.execute(
            "CREATE TABLE duplicates AS SELECT n.key, n.id, c.path, c.line, c.reason FROM new n "
            "JOIN claims c USING (source, id) WHERE n.reason IS NULL AND (c.earlier OR n.key <> c.key)"
        )
        db.execute(
            "COPY (SELECT key >> 32 AS file, key & 4294967295 AS line, id, path, line AS first_line, reason "
            f"FROM duplicates ORDER BY key) TO {quoted(folder / 'duplicate-ids.parquet')} (FORMAT parquet)"
        )
        db.execute("SET threads=1")  # one writer thread: the same bytes whatever curate.workers is
        db.execute(
            "COPY (SELECT source, id, path, line, reason FROM claims WHERE NOT earlier ORDER BY key) "
            f"TO {quoted(index / f'{batch_name}.parquet')} (FORMAT parquet)"
        )


def duplicate_id_record(source: str, path: str, line: int, doc_id: str, text: str, claim: list) -> Record:
    """The quarantine record of a good record (or piece) whose id `claim` ([path, line, reason]
    of the claiming record, see `find_duplicate_ids`) took first, naming it."""
    first_path, first_line, first_reason = claim
    record = Record(file=path, line=line, id=doc_id, reason="duplicate_id", excerpt=text[:200])
    if first_reason is None:
        record.kept = f"{first_path}:{first_line}"
        record.detail = f"id {doc_id!r} already taken in {source} by {record.kept}, which is kept"
    else:
        record.detail = (
            f"id {doc_id!r} first seen in {source} at {first_path}:{first_line}, quarantined there as "
            f"{first_reason}; no record with this id is kept"
        )
    return record


def decontaminate(
    doc_id: str, text: str, contamination: dict[tuple[str, ...], str], spec: CurateSpec
) -> tuple[list[tuple[str, str]], list[str]]:
    """(documents kept, benchmark items hit). Clean text comes back whole. A contaminated one is
    dropped (decontaminate: document) or cut (span): every n-gram window shared with a benchmark
    item goes, with decontaminate_margin words each side, and the text between the cuts is kept
    as documents `<id>#clean<k>` (pieces shorter than min_chars go too)."""
    n = spec.decontaminate_ngram
    words = list(WORD.finditer(text))
    lowered = [w.group().lower() for w in words]
    starts = [i for i in range(len(words) - n + 1) if tuple(lowered[i : i + n]) in contamination]
    if not starts:
        return [(doc_id, text)], []
    hits = list(dict.fromkeys(contamination[tuple(lowered[i : i + n])] for i in starts))
    if spec.decontaminate == "document":
        return [], hits
    cuts: list[list[int]] = []  # word ranges [first, last) to remove, merged
    for i in starts:
        first, last = max(0, i - spec.decontaminate_margin), min(len(words), i + n + spec.decontaminate_margin)
        if cuts and first <= cuts[-1][1]:
            cuts[-1][1] = max(cuts[-1][1], last)
        else:
            cuts.append([first, last])
    pieces, start = [], 0
    for first, last in cuts:
        pieces.append(text[start : words[first].start()].strip())
        start = words[last - 1].end()
    pieces.append(text[start:].strip())
    kept = [piece for piece in pieces if len(piece) >= spec.min_chars]
    return [(f"{doc_id}#clean{k}", piece) for k, piece in enumerate(kept)], hits


def _pairs(path: Path) -> Iterator[tuple[int, str]]:
    with open(path, encoding="utf-8") as lines:
        for line in lines:
            position, name = json.loads(line)
            yield position, name


class CleanDocuments(PipelineStep):
    """Task r of a batch: drop the exact duplicates `find_exact_duplicates` found among its
    documents, decontaminate the others, write what was removed and why and the pieces kept
    (see the module docstring), and pass the pieces on, in order."""

    type = "🫂 - DEDUP"
    name = "🧽 exact dedupe and decontamination"

    def __init__(self, work: str, benchmarks: list, spec: CurateSpec) -> None:
        super().__init__()
        self.work, self.benchmarks, self.spec = Path(work), benchmarks, spec

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        contamination = benchmark_ngrams(self.benchmarks, self.spec.decontaminate_ngram)  # built in the task
        name = f"{rank:05d}"
        (self.work / "kept").mkdir(exist_ok=True)
        (self.work / "removed").mkdir(exist_ok=True)
        duplicates = _pairs(self.work / "exact" / f"{name}.jsonl")
        duplicate = next(duplicates, None)
        with (
            open(self.work / "kept" / f"{name}.jsonl", "w", encoding="utf-8") as kept,
            open(self.work / "kept" / f"{name}.positions", "wb") as positions,
            open(self.work / "removed" / f"{name}.jsonl", "w", encoding="utf-8") as removed,
        ):
            for document in data:
                position, source, doc_id = int(document.id), document.metadata["source"], document.metadata["doc"]
                self.stat_update("documents")
                if duplicate is not None and duplicate[0] == position:
                    row = {"id": doc_id, "reason": "exact_duplicate", "of": duplicate[1]}
                    removed.write(json.dumps([position, source, row], ensure_ascii=False) + "\n")
                    self.stat_update("exact_duplicate")
                    duplicate = next(duplicates, None)
                    continue
                pieces, hits = decontaminate(doc_id, document.text, contamination, self.spec)
                if hits:
                    cut = len(document.text) - sum(len(text) for _, text in pieces)
                    reason = "contaminated" if self.spec.decontaminate == "document" else "contaminated_span"
                    row = {"id": doc_id, "reason": reason, "of": hits[0], "chars": cut, "pieces": len(pieces)}
                    removed.write(json.dumps([position, source, row], ensure_ascii=False) + "\n")
                    self.stat_update(reason)
                for piece_id, text in pieces:
                    kept.write(json.dumps([position, source, piece_id, text], ensure_ascii=False) + "\n")
                    positions.write(POSITION.pack(position))
                    yield Document(text=text, id=document.id, metadata={"source": source, "doc": piece_id})


def piece_positions(work: Path, rank: int) -> np.ndarray:
    """The position of each piece task `rank` kept, by its index in the task (read from disk on demand)."""
    path = work / "kept" / f"{rank:05d}.positions"
    return np.memmap(path, dtype="<i8", mode="r") if path.stat().st_size else np.zeros(0, dtype="<i8")


def _rows(path: Path, rank: int) -> Iterator[tuple[int, int, int, list]]:
    with open(path, encoding="utf-8") as lines:
        for index, line in enumerate(lines):
            row = json.loads(line)
            yield row[0], rank, index, row


def merged(work: Path, kind: str, tasks: int) -> Iterator[tuple[int, int, int, list]]:
    """(position, task, index in the task, row) of every row the tasks wrote to work/<kind>/,
    in position order (a document's pieces in the order they were cut)."""
    streams = [_rows(work / kind / f"{rank:05d}.jsonl", rank) for rank in range(tasks)]
    return heapq.merge(*streams, key=lambda item: item[0])
