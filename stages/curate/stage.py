"""curate: validate, normalise, dedupe (exact and MinHash, across sources), decontaminate
and split off held-out validation documents.

Writes under `<workdir>/curate/`:
  <source>/train-BBBB.parquet, <source>/validation-BBBB.parquet   clean docs (id, text) of batch BBBB
  quarantine/<source>/batch-BBBB.jsonl   bad records: source, file, line, id, reason, detail, excerpt
  removed/<source>/batch-BBBB.jsonl      good records removed: exact/near duplicate, contaminated
  state.sqlite, id-index/, exact-index/, minhash-index/   what has been seen (files, ids, texts), for incremental reruns
  report.json, _SUCCESS.json
and `<workdir>/.curate-hashes/`: the sha256 of each input file at its size and mtime.

A run processes only files whose content was not curated before (a batch); `force` starts
over. Files are known by their content (sha256), not their mtime: a file copied again, or
under another name, is not new data. Documents stream through files in `curate.tmp/work/`
(stages/curate/steps.py): memory does not hold a batch. The whole folder is rebuilt in
`curate.tmp/` and swapped into place, so a failed run (bad data, a full disk) leaves the
previous good output untouched.
"""

from __future__ import annotations

import glob
import hashlib
import heapq
import itertools
import json
import logging
import os
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

from refit.stages.core.config import CurateSpec, Recipe, SourceSpec
from refit.stages.core.contract import Stage
from refit.stages.core.file_hashes import memoized_sha256
from refit.stages.core.input_files import InputFileError, load_benchmark
from refit.stages.core.markers import (
    damaged_outputs,
    is_done,
    read_marker,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.core.paths import inside
from refit.stages.curate.records import Record, file_problem, read_records, unreadable

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
FOLDER = "curate"
ROLE_ORDER = {"legacy": 0, "new": 1, "qa": 2}  # earlier roles win near-duplicate ties
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (source TEXT, path TEXT, sha256 TEXT, batch INTEGER, PRIMARY KEY (source, path));
CREATE TABLE IF NOT EXISTS unreadable (source TEXT, path TEXT, reason TEXT, batch INTEGER,
    PRIMARY KEY (source, path, reason));
"""
HASH_MEMO = ".curate-hashes"  # in the workdir: the sha256 of each input file at its size and mtime


@with_config(ConfigDict(extra="forbid"))
class CurateReport(TypedDict):
    stage: str
    batch: int  # 1 for the first run over a workdir, +1 for each incremental run
    incremental: bool  # only files new since the previous batch were read
    sources: dict[str, dict]  # per source: files, records, quarantined, removed, train/validation docs
    warnings: list[str]
    seconds: float


class CurationError(RuntimeError):
    """The stage failed; the previous curated output is untouched."""


def source_files(source: SourceSpec, patterns: list[str] | None = None) -> tuple[list[Path], list[Record]]:
    """The files matching a source's paths (or the patterns given, e.g. its validation_paths),
    and the quarantine row of every other path they match (a broken link, a folder, a FIFO, a
    name that is not UTF-8): none is skipped silently. Only the folders a pattern ending in
    `**` walks through are not inputs."""
    patterns = source.paths if patterns is None else patterns
    matched = set()
    for pattern in patterns:
        for name in glob.glob(pattern, recursive=True):
            if not (pattern.endswith("**") and os.path.isdir(name)):
                matched.add(Path(name))
    listed = [(path, file_problem(path)) for path in sorted(matched)]
    return [path for path, problem in listed if problem is None], [problem for _, problem in listed if problem]


Listing = dict[str, tuple[list[tuple[str, str]], list[Record]]]


def _listing(recipe: Recipe, workdir: Path | None) -> Listing:
    """source -> ([(path, sha256)] of every input file, the quarantine rows of the paths that
    cannot be read); a file is read again only when its size or mtime changed (the memo in
    `<workdir>/.curate-hashes/`)."""
    memo = Path(workdir or recipe.workdir) / HASH_MEMO
    listing = {}
    for source in recipe.sources:
        paths, problems = source_files(source)
        files = []
        for path in paths:
            try:
                files.append((str(path), memoized_sha256(path, memo)))
            except OSError as error:  # unreadable, gone since it was listed: its row, and the run goes on
                problems.append(unreadable(path, error))
        listing[source.name] = files, problems
    return listing


def _version(listing: Listing) -> str:
    contents = {name: sorted({sha256 for _, sha256 in files}) for name, (files, _) in listing.items()}
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()


def data_version(recipe: Recipe, workdir: Path | None = None) -> str:
    """Hash of the contents of each source's files: changes when new data arrives, not when
    files are copied again, touched or renamed. The hash cache is in workdir (default the recipe's)."""
    return _version(_listing(recipe, workdir))


def _inputs(recipe: Recipe, listing: Listing) -> dict:
    """What curated output depends on besides the recipe values it declares: the benchmarks it
    decontaminates against and the explicit validation files (a change starts over, see
    `_settings_hash`), and the contents of every input file (new data means a new batch)."""
    # a path that appears, or changes, and cannot be read reruns the stage: it is reported, not skipped
    problems = {name: [(row.file, row.reason) for row in rows] for name, (_, rows) in listing.items() if rows}
    benchmarks = recipe.evaluate.benchmarks
    return {
        "benchmarks": {b.name: hashlib.sha256(Path(b.path).read_bytes()).hexdigest() for b in benchmarks},
        "validation_files": _validation_listing(recipe),
        "data": _version(listing),
        **({"unreadable": problems} if problems else {}),
    }


def other_inputs(recipe: Recipe, workdir: Path) -> dict:
    """`_inputs` over the input files as they are now (the hash memo is in the workdir)."""
    return _inputs(recipe, _listing(recipe, workdir))


def _settings_hash(recipe: Recipe, inputs: dict) -> str:
    """What a batch builds on, all but the input files: curated output made with other settings,
    benchmarks, validation files or code is not extended by a new batch, but redone."""
    settings = {"recipe": STAGE.recipe_values(recipe), "code": STAGE.code_version}
    settings |= {key: inputs[key] for key in ("benchmarks", "validation_files")}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _bucket(doc_id: str) -> float:
    """A document's place in [0, 1) for the hash split: a pure function of its id."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


class HashSplit:
    """Which of a source's kept documents are held out for validation: documents in id-hash
    order are held out while their bucket is below validation_fraction, then further ones
    until the source's validation set (held_chars from earlier batches included) reaches
    min_validation_tokens x chars_per_token characters, within max_validation_fraction of
    this batch's characters. validation_fraction 0: none.

    Two passes over the documents, neither holding them: `count` sees each (its bucket, place
    and length go to a Parquet spool), `choose` sorts the spool on disk (DuckDB) only when
    the documents below validation_fraction fall short of the target, and reads it only until
    the target is reached; `held_out` then answers for each document in the same order."""

    def __init__(self, spool: Path, spec: CurateSpec, held_chars: int) -> None:
        import pyarrow as pa

        from refit.stages.curate.steps import RowGroupWriter

        self.spec, self.spool = spec, spool
        self.target = spec.min_validation_tokens * spec.chars_per_token - held_chars
        self.chars = self.below_fraction_chars = self.seen = self.answered = 0
        self.extra: set[int] = set()  # places of the documents held out beyond the fraction: under target chars
        schema = pa.schema([("bucket", pa.float64()), ("place", pa.int64()), ("chars", pa.int64())])
        self.rest = RowGroupWriter(spool, schema)

    def count(self, doc_id: str, chars: int) -> None:
        bucket = _bucket(doc_id)
        self.chars += chars
        if bucket < self.spec.validation_fraction:
            self.below_fraction_chars += chars
        else:
            self.rest.add(bucket, self.seen, chars)
        self.seen += 1

    def choose(self, threads: int) -> None:
        from refit.stages.curate.steps import duckdb_connection, quoted

        self.rest.close()
        taken, limit = self.below_fraction_chars, self.spec.max_validation_fraction * self.chars
        if self.spec.validation_fraction == 0 or taken >= self.target or not self.rest.rows:
            return
        with closing(duckdb_connection(self.spool.with_suffix(".duckdb"), threads)) as db:
            rows = db.execute(f"SELECT place, chars FROM read_parquet({quoted(self.spool)}) ORDER BY bucket, place")
            while taken < self.target and (batch := rows.fetchmany(4096)):
                for place, chars in batch:
                    if taken >= self.target:
                        break
                    if taken + chars <= limit:
                        self.extra.add(place)
                        taken += chars

    def held_out(self, doc_id: str) -> bool:
        """Whether the next document (in the order `count` saw them) is held out."""
        place, self.answered = self.answered, self.answered + 1
        if self.spec.validation_fraction == 0:
            return False
        return _bucket(doc_id) < self.spec.validation_fraction or place in self.extra


def _validation_listing(recipe: Recipe) -> dict:
    """The explicit validation files of each source that has them, and the paths among them
    that cannot be read (part of the settings: a change starts over)."""
    listing = {}
    for source in (s for s in recipe.sources if s.validation_paths):
        files, problems = source_files(source, source.validation_paths)
        listing[source.name] = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        listing[source.name] += [(row.file, row.reason) for row in problems]
    return listing


def _read_validation(source: SourceSpec, spec: CurateSpec, out: Path, hashes) -> None:
    """A source's explicit validation files as validation-0000.parquet, bad records quarantined;
    their text hashes go to `hashes` (the exact index of batch 0), so that a training copy is
    removed as an exact duplicate."""
    from refit.stages.curate.steps import LazyJsonl, text_hash

    documents = _curated_writer(out / source.name / "validation-0000.parquet")
    quarantined = LazyJsonl(out / "quarantine" / source.name / "validation.jsonl")
    files, problems = source_files(source, source.validation_paths)
    for record in itertools.chain(problems, *(read_records(path, source, spec) for path in files)):
        if record.reason is not None:
            quarantined.write(record.quarantine_row(source.name))
            continue
        hashes.add(text_hash(record.text), hashes.rows, f"{source.name}:validation:{record.doc_id}")
        documents.add(record.doc_id, record.text, chars=len(record.text))
    documents.close()
    quarantined.close()


def _index_validation_files(sources: list[SourceSpec], spec: CurateSpec, out: Path) -> None:
    """Every source's explicit validation files as its validation-0000.parquet; their texts
    are the exact index of batch 0 (`exact-index/batch-0000.parquet`)."""
    from refit.stages.curate.steps import HASH_SCHEMA, RowGroupWriter, index_first_occurrences

    work = out / "work" / "validation"
    hashes = RowGroupWriter(work / "hashes.parquet", HASH_SCHEMA)
    for source in sources:
        if source.validation_paths:
            _read_validation(source, spec, out, hashes)
    hashes.close()
    index_first_occurrences(work / "hashes.parquet", out / "exact-index" / "batch-0000.parquet", work)


def _validation_size(folder: Path, source: str) -> tuple[int, int]:
    """(documents, characters) of a source's validation set in a curate folder (final or
    staging), every batch, read a record batch at a time."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    docs = chars = 0
    for path in sorted((Path(folder) / source).glob("validation-*.parquet")):
        parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)
        docs += parquet.metadata.num_rows
        for batch in parquet.iter_batches(batch_size=4096, columns=["text"]):
            chars += pc.sum(pc.utf8_length(batch.column(0))).as_py() or 0
    return docs, chars


def validation_texts(workdir: Path, source: str, limit: int) -> list[str]:
    """The first `limit` held-out documents of one source of the finished curate output, every
    batch in order (what evaluate scores and the safety probes prompt with); only they are read."""
    return list(itertools.islice(iter_validation_texts(workdir, source), limit))


def iter_validation_texts(workdir: Path, source: str) -> Iterator[str]:
    """The held-out documents of one source, every batch in order, one record batch at a time."""
    import pyarrow.parquet as pq

    for f in curated_files(workdir, source, "validation"):
        for batch in pq.ParquetFile(f).iter_batches(columns=["text"]):
            yield from batch.column(0).to_pylist()


def validation_count(workdir: Path, source: str) -> int:
    """How many documents of the source are held out (from the Parquet footers)."""
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in curated_files(workdir, source, "validation"))


def _validation_summary(folder: Path, source: SourceSpec, spec: CurateSpec) -> tuple[dict, str | None]:
    """The source's whole validation set (every batch): size, estimated tokens, and a warning
    when it is below min_validation_tokens."""
    docs, chars = _validation_size(folder, source.name)
    tokens = int(chars / spec.chars_per_token)
    summary = {
        "split": "files" if source.validation_paths else "hash",
        "docs": docs,
        "chars": chars,
        "estimated_tokens": tokens,
        "token_estimate": f"characters / curate.chars_per_token ({spec.chars_per_token:g})",
    }
    warning = None
    if tokens < spec.min_validation_tokens and (source.validation_paths or spec.validation_fraction > 0):
        warning = (
            f"{source.name}: validation set of {docs} documents, about {tokens:,} tokens, is below "
            f"curate.min_validation_tokens {spec.min_validation_tokens:,}: its loss has a large standard error; "
            + (
                "add documents to its validation_paths"
                if source.validation_paths
                else f"the hash split stopped at max_validation_fraction {spec.max_validation_fraction:g}: give the "
                "source validation_paths or more data"
            )
        )
    return summary, warning


def _curated_writer(path: Path):
    """A curated Parquet file (id, text), written a row group at a time."""
    import pyarrow as pa

    from refit.stages.curate.steps import ROWS_PER_GROUP, RowGroupWriter

    schema = pa.schema([("id", pa.string()), ("text", pa.string())])  # typed even when empty
    return RowGroupWriter(path, schema, ROWS_PER_GROUP)


def _new_files(
    db: sqlite3.Connection, source: SourceSpec, listed: list[tuple[str, str]]
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """The (path, sha256) of the source's files whose content is new, and of those that are
    copies of content curated before (recorded, not read again)."""
    known = {sha256 for (sha256,) in db.execute("SELECT sha256 FROM files WHERE source=?", (source.name,))}
    new, copies = [], []
    for path, sha256 in listed:
        row = db.execute("SELECT sha256 FROM files WHERE source=? AND path=?", (source.name, path)).fetchone()
        if row is not None and row[0] != sha256:
            raise CurationError(
                f"source {source.name}: {path} changed since it was curated; curation adds new files "
                "incrementally but does not redo old ones: rerun with --force to start over"
            )
        if row is None:
            (copies if sha256 in known else new).append((path, sha256))
            known.add(sha256)
    return new, copies


def _new_problems(db: sqlite3.Connection, source: SourceSpec, rows: list[Record], batch: int) -> list[Record]:
    """The rows of the source's paths that cannot be read and that no earlier batch reported
    (recorded now): like a file's records, a path's problem counts in one batch only."""
    known = set(db.execute("SELECT path, reason FROM unreadable WHERE source=?", (source.name,)))
    new = [row for row in rows if (row.file, row.reason) not in known]
    db.executemany("INSERT INTO unreadable VALUES (?, ?, ?, ?)", [(source.name, r.file, r.reason, batch) for r in new])
    return new


def _read_batch(files: list[tuple[SourceSpec, str]], work: Path, index: Path, batch: int, spec: CurateSpec) -> None:
    """Read and validate the batch's files as datatrove tasks on curate.executor (at most
    curate.workers, each its share of the files), then decide the id claims (curate_steps)."""
    import pandas  # noqa: F401  pyarrow imports it at its first array: once here, not in every forked task

    from refit.stages.core.executors import Step, run_steps
    from refit.stages.curate.steps import ReadRecords, find_duplicate_ids

    folder = work / "read"
    folder.mkdir(parents=True)
    if not files:
        return
    run_steps(
        [Step("read", [ReadRecords(str(folder), files, spec)], min(spec.workers, len(files)))], spec, work / "logs"
    )
    find_duplicate_ids(folder, index, f"batch-{batch:04d}", [path for _, path in files], spec.workers)


def _file_events(folder: Path, order: int) -> Iterator[tuple[int, str, tuple | None]]:
    """(line, JSON row, None) for each quarantined record of a file read, and (line, row tail,
    (hash, name, chars)) for each clean document, in line order."""
    from refit.stages.curate.steps import parquet_rows

    name = folder / f"{order:05d}"

    def quarantined() -> Iterator[tuple[int, str, None]]:
        with open(name.with_suffix(".quarantine.jsonl"), encoding="utf-8") as rows:
            for row in rows:
                yield json.loads(row)["line"], row, None

    def documents() -> Iterator[tuple[int, str, tuple]]:
        with open(name.with_suffix(".docs"), encoding="utf-8") as tails:
            for (line, hash_, doc, chars), tail in zip(parquet_rows(name.with_suffix(".parquet")), tails, strict=True):
                yield line, tail, (hash_, doc, chars)

    return heapq.merge(quarantined(), documents(), key=lambda event: event[0])


def _deal(
    sources: list[SourceSpec], new_files: dict, problems: dict, folder: Path, spool, out: Path, batch: int, spec
) -> dict:
    """Go through the files read, in batch order: copy each source's quarantined records into
    its quarantine file, with the duplicate ids at their place, and deal its clean documents
    into the spool; fail when a source has too many bad records. Each path of `problems` (source
    -> rows of the paths that cannot be read) is one bad record. Returns, per source, its files,
    copies, counts and bad fraction."""
    from refit.stages.curate.steps import LazyJsonl, duplicate_id_record, parquet_rows

    duplicates = parquet_rows(folder / "duplicate-ids.parquet")  # (file, line, id, path, first_line, reason)
    duplicate = next(duplicates, None)
    screened, order = {}, 0
    for source in sources:
        files, copies = new_files[source.name]
        counts: Counter[str] = Counter()
        quarantined = LazyJsonl(inside(out / "quarantine", source.name, f"batch-{batch:04d}.jsonl"))
        for record in problems[source.name]:
            counts.update(["records", f"quarantined:{record.reason}"])
            quarantined.write(record.quarantine_row(source.name))
        for path, _ in files:
            counts.update(json.loads((folder / f"{order:05d}.counts.json").read_text()))
            for line, row, document in _file_events(folder, order):
                while duplicate is not None and duplicate[:2] < (order, line):  # records gone by
                    duplicate = next(duplicates, None)
                if document is None:
                    quarantined.write_line(row)
                elif duplicate is not None and duplicate[:2] == (order, line):
                    text = json.loads("{" + row)["text"]
                    record = duplicate_id_record(source.name, path, line, duplicate[2], text, duplicate[3:])
                    quarantined.write(record.quarantine_row(source.name))
                    counts["quarantined:duplicate_id"] += 1
                else:
                    hash_, name, chars = document
                    counts["chars"] += chars
                    spool.add(row, hash_, name)
            order += 1
        quarantined.close()
        screened[source.name] = {"files": files, "copies": copies, "counts": counts}
        _check_bad_fraction(source, screened[source.name], spec)
    return screened


def _check_bad_fraction(source: SourceSpec, screened: dict, spec: CurateSpec) -> None:
    counts = screened["counts"]
    bad = sum(v for k, v in counts.items() if k.startswith("quarantined:"))
    screened["bad_fraction"] = bad_fraction = bad / counts["records"] if counts["records"] else 0.0
    if bad_fraction > spec.max_bad_fraction:
        top = Counter({k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("quarantined:")}).most_common(3)
        raise CurationError(
            f"source {source.name}: {bad_fraction:.1%} of {counts['records']} records are bad "
            f"(limit curate.max_bad_fraction {spec.max_bad_fraction:.1%}); top reasons: "
            + ", ".join(f"{reason} {n}" for reason, n in top)
            + "; previous curated output kept"
        )


def _dedupe_and_write(sources: list[SourceSpec], tasks: int, out: Path, batch: int, recipe: Recipe) -> dict[str, dict]:
    """Exact dedupe, decontamination and MinHash over the spooled documents of every source
    (see curate_steps), then the kept ones streamed into each source's train/validation
    Parquet files and the removed ones into its removed list, naming the document kept.
    Returns, per source, what was removed and written."""
    from datatrove.pipeline.readers import JsonlReader

    from refit.stages.curate.near_dedup import EARLIER_BATCH, near_dedup_feed
    from refit.stages.curate.steps import CleanDocuments, LazyJsonl, find_exact_duplicates, merged

    spec, work, name = recipe.curate, out / "work", f"batch-{batch:04d}"
    removed = {s.name: LazyJsonl(inside(out / "removed", s.name, f"{name}.jsonl")) for s in sources}
    result = {s.name: {"removed": Counter(), "contaminated_ids": [], "contaminated_chars": 0} for s in sources}
    near: dict = {}
    if tasks:
        find_exact_duplicates(work, out / "exact-index", name, tasks, spec.workers)
        feed = [
            JsonlReader(str(work / "clean"), glob_pattern="*.jsonl", compression=None),
            CleanDocuments(str(work), recipe.evaluate.benchmarks, spec),
        ]
        near = near_dedup_feed(feed, tasks, work, out / "minhash-index", name, spec)
        for _, _, _, (_, source, row) in merged(work, "removed", tasks):
            removed[source].write(row)
            result[source]["removed"][row["reason"]] += 1
            if row["reason"].startswith("contaminated"):
                result[source]["contaminated_ids"].append(row["id"])
                result[source]["contaminated_chars"] += row["chars"]
    splits = {  # held-out chars of earlier batches are counted before this batch's file exists
        s.name: HashSplit(work / "split" / f"{s.name}.parquet", spec, _validation_size(out, s.name)[1])
        for s in sources
        if not s.validation_paths  # held out by the recipe's files, not by hash
    }
    originals = {kept for kept in near.values() if kept != EARLIER_BATCH}
    names: dict = {}  # the "source:id" of each document kept in place of near-duplicates
    for _, rank, index, (_, source, doc_id, text) in merged(work, "kept", tasks):
        if (rank, index) in originals:  # comes before its duplicates: the kept one has the lowest position
            names[rank, index] = f"{source}:{doc_id}"
        if (rank, index) in near:
            kept = near[rank, index]
            of = "a document of an earlier batch" if kept == EARLIER_BATCH else names[kept]
            removed[source].write({"id": doc_id, "reason": "near_duplicate", "of": of})
            result[source]["removed"]["near_duplicate"] += 1
        elif source in splits:
            splits[source].count(doc_id, len(text))
    for handle in removed.values():
        handle.close()
    for split in splits.values():
        split.choose(spec.workers)
    writers = {
        (s.name, part): _curated_writer(inside(out, s.name, f"{part}-{batch:04d}.parquet"))
        for s in sources
        for part in ("train", "validation")
    }
    for _, rank, index, (_, source, doc_id, text) in merged(work, "kept", tasks):
        if (rank, index) not in near:
            part = "validation" if source in splits and splits[source].held_out(doc_id) else "train"
            writers[source, part].add(doc_id, text, chars=len(text))
    train_chars = Counter()
    for (source, part), writer in writers.items():
        writer.close()
        result[source][f"{part}_docs"] = writer.rows
        train_chars[source] += writer.chars if part == "train" else 0
    for source, chars in train_chars.items():
        result[source]["train_chars"] = chars
    return result


def _source_report(source: SourceSpec, screened: dict, written: dict, db: sqlite3.Connection, batch: int) -> dict:
    """Record a source's files as curated in this batch; returns its report."""
    for path, sha256 in screened["files"] + screened["copies"]:
        db.execute("INSERT INTO files VALUES (?, ?, ?, ?)", (source.name, path, sha256, batch))
    counts = screened["counts"]
    return {
        "files": [path for path, _ in screened["files"]],
        "copies_of_curated_files": [path for path, _ in screened["copies"]],
        "records": counts["records"],
        "split_parts": counts["split_parts"],
        "quarantined": {k.split(":", 1)[1]: v for k, v in sorted(counts.items()) if k.startswith("quarantined:")},
        "bad_fraction": round(screened["bad_fraction"], 6),
        "removed": dict(sorted(written["removed"].items())),
        "contaminated_ids": written["contaminated_ids"],
        "contaminated_docs": len(written["contaminated_ids"]),
        "contaminated_chars": written["contaminated_chars"],
        "contaminated_char_fraction": round(written["contaminated_chars"] / max(counts["chars"], 1), 6),
        "train_docs": written["train_docs"],
        "validation_docs": written["validation_docs"],
        "train_chars": written["train_chars"],
    }


def run_curate(recipe: Recipe, workdir: Path, force: bool = False) -> CurateReport:
    """Curate every source into `<workdir>/curate/`; returns the report (also in report.json)."""
    final = Path(workdir) / FOLDER
    listing = _listing(recipe, workdir)  # one listing: a file arriving mid-run is the next run's
    inputs = _inputs(recipe, listing)
    expected = STAGE.fingerprint_with(recipe, workdir, inputs)
    if not force and is_done(final, expected):
        log.info("curate: up to date (%s)", expected[:12])
        return json.loads((final / "report.json").read_text())
    return _curate(recipe, final, force, _settings_hash(recipe, inputs), listing, expected)


def _curate(recipe: Recipe, final: Path, force: bool, settings_hash: str, listing: dict, expected: str) -> dict:
    from refit.stages.core.executors import executor_session
    from refit.stages.curate.steps import Spool

    started = time.time()
    try:  # read again in every decontamination task: a malformed item fails here, not in a datatrove worker
        for bench in recipe.evaluate.benchmarks:
            load_benchmark(Path(bench.path))
    except InputFileError as error:
        raise CurationError(f"benchmark {error}; previous curated output kept") from None
    previous = read_marker(final)
    damaged = damaged_outputs(final, previous) if previous else {}
    if damaged:  # a batch builds on every earlier one: with one of them damaged, start over
        name, wrong = next(iter(damaged.items()))
        log.warning("curate: the previous output's %s %s: curating every file again", name, wrong)
    incremental = not force and previous is not None and not damaged and previous.get("settings") == settings_hash
    with staged_output(final, seed_previous=incremental) as out:
        # one transaction for the run: the database only counts once swapped into place, so a
        # commit per insert (an fsync each, ~1 ms) would buy nothing
        with closing(sqlite3.connect(out / "state.sqlite")) as db:  # closed on failure too: the folder is removed
            db.executescript(SCHEMA)
            batches = "SELECT batch FROM files UNION ALL SELECT batch FROM unreadable"
            batch = (db.execute(f"SELECT MAX(batch) FROM ({batches})").fetchone()[0] or 0) + 1
            sources = sorted(recipe.sources, key=lambda s: ROLE_ORDER[s.role])
            if batch == 1 and any(source.validation_paths for source in sources):
                _index_validation_files(sources, recipe.curate, out)  # read once, before training text
            new_files = {s.name: _new_files(db, s, listing[s.name][0]) for s in sources}
            problems = {s.name: _new_problems(db, s, listing[s.name][1], batch) for s in sources}
            files = [(s, path) for s in sources for path, _ in new_files[s.name][0]]  # the batch order
            log.info("curate: reading %d files (batch %d)", len(files), batch)
            work = out / "work"
            with executor_session(recipe.curate):  # on Ray: one cluster for the reading and the MinHash steps
                _read_batch(files, work, out / "id-index", batch, recipe.curate)
                spool = Spool(work, recipe.curate.workers)
                screened = _deal(sources, new_files, problems, work / "read", spool, out, batch, recipe.curate)
                written = _dedupe_and_write(sources, spool.close(), out, batch, recipe)
            report_sources = {s.name: _source_report(s, screened[s.name], written[s.name], db, batch) for s in sources}
            warnings = []
            for source in sources:
                report_sources[source.name]["validation"], warning = _validation_summary(out, source, recipe.curate)
                warnings += [warning] if warning else []
                if warning:
                    log.warning("curate: %s", warning)
            db.commit()
        shutil.rmtree(out / "work", ignore_errors=True)
        report = {
            "stage": "curate",
            "batch": batch,
            "incremental": incremental,
            "sources": report_sources,
            "warnings": warnings,
            "seconds": round(time.time() - started, 2),
        }
        write_json_atomic(out / "report.json", report)
        extra = {"settings": settings_hash, "data_version": _version(listing)}
        write_marker(out, "curate", expected, started, STAGE.code_version, extra)
    return report


def curated_files(workdir: Path, source: str, split: str) -> list[Path]:
    """The curated Parquet files of one source and split ("train" or "validation"), in batch order."""
    return sorted(inside(Path(workdir) / FOLDER, source).glob(f"{split}-*.parquet"))


def curated_texts(path: Path, batch_size: int, start: int = 0, stop: int | None = None) -> Iterator[pa.StringArray]:
    """The texts of rows [start, stop) of a curated file, at most batch_size at a time. Only the
    row groups holding them are read, through a small buffer: memory does not grow with the file."""
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(path, buffer_size=1 << 20, pre_buffer=False)  # pre-buffering reads whole column chunks
    stop = parquet.metadata.num_rows if stop is None else stop
    groups, row = [], None  # row: the first row of the first group read
    first = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if first < stop and first + rows > start:
            groups.append(group)
            row = first if row is None else row
        first += rows
    if not groups:
        return
    for batch in parquet.iter_batches(batch_size=batch_size, row_groups=groups, columns=["text"]):
        low, high = max(start - row, 0), min(stop - row, batch.num_rows)
        if low < high:
            yield batch.column(0).slice(low, high - low)
        row += batch.num_rows
        if row >= stop:
            return


def curated_data_version(workdir: Path) -> str | None:
    """The data version (see `data_version`) of the finished curated output, if any."""
    marker = read_marker(Path(workdir) / FOLDER)
    return marker.get("data_version") if marker else None


STAGE = Stage(
    name="curate",
    reads=(),
    # the benchmarks: decontaminated against (their contents, in `other_inputs`); the workdir: its hash memo
    recipe_reads=("sources", "curate", "evaluate.benchmarks.name", "evaluate.benchmarks.path", "workdir"),
    folder=FOLDER,
    report=CurateReport,
    run_function=run_curate,
    other_inputs=other_inputs,
)
