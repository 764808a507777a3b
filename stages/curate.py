"""curate: validate, normalise, dedupe (exact and MinHash, across sources), decontaminate
and split off held-out validation documents.

Writes under `<workdir>/curate/`:
  <source>/train-BBBB.parquet, <source>/validation-BBBB.parquet   clean docs (id, text) of batch BBBB
  quarantine/<source>/batch-BBBB.jsonl   bad records: source, file, line, id, reason, detail, excerpt
  removed/<source>/batch-BBBB.jsonl      good records removed: exact/near duplicate, contaminated
  state.sqlite, minhash-index/           what has been seen, for incremental reruns
  report.json, _SUCCESS.json
and `<workdir>/.curate-hashes/`: the sha256 of each input file at its size and mtime.

A run processes only files whose content was not curated before (a batch); `force` starts
over. Files are known by their content (sha256), not their mtime: a file copied again, or
under another name, is not new data. The whole folder is rebuilt in `curate.tmp/` and
swapped into place, so a failed run (bad data, a full disk) leaves the previous good
output untouched.
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import logging
import shutil
import sqlite3
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from refit.stages.lib.config import CurateSpec, Recipe, SourceSpec
from refit.stages.lib.contract import Stage
from refit.stages.lib.file_hashes import memoized_sha256
from refit.stages.lib.markers import (
    code_version,
    fingerprint,
    is_done,
    read_marker,
    staged_output,
    write_json_atomic,
    write_marker,
)
from refit.stages.lib.paths import inside
from refit.stages.lib.records import Record, read_records
from refit.stages.lib.text import WORD, benchmark_ngrams

if TYPE_CHECKING:
    import pyarrow as pa

log = logging.getLogger(__name__)
FOLDER = "curate"
ROLE_ORDER = {"legacy": 0, "new": 1, "qa": 2}  # earlier roles win near-duplicate ties
SCHEMA = """
CREATE TABLE IF NOT EXISTS files (source TEXT, path TEXT, sha256 TEXT, batch INTEGER, PRIMARY KEY (source, path));
CREATE TABLE IF NOT EXISTS ids (source TEXT, id TEXT, file TEXT, line INTEGER, reason TEXT, PRIMARY KEY (source, id));
CREATE TABLE IF NOT EXISTS texts (hash TEXT PRIMARY KEY, source TEXT, id TEXT);
"""
EXECUTION_SETTINGS = {"executor", "ray", "slurm", "workers"}  # where the steps run: decisions do not depend on it
HASH_MEMO = ".curate-hashes"  # in the workdir: the sha256 of each input file at its size and mtime


class CurationError(RuntimeError):
    """The stage failed; the previous curated output is untouched."""


def source_files(source: SourceSpec, patterns: list[str] | None = None) -> list[Path]:
    """The files matching a source's paths (or the patterns given, e.g. its validation_paths)."""
    patterns = source.paths if patterns is None else patterns
    return sorted({Path(p) for pattern in patterns for p in glob.glob(pattern, recursive=True) if Path(p).is_file()})


def _settings(recipe: Recipe) -> dict:
    """What curated output depends on apart from the input files: changing it means starting over."""
    benchmarks = {b.name: hashlib.sha256(Path(b.path).read_bytes()).hexdigest() for b in recipe.evaluate.benchmarks}
    sources = [s.model_dump(mode="json", exclude={"paths"}) for s in recipe.sources]
    return {
        "curate": recipe.curate.model_dump(mode="json", exclude=EXECUTION_SETTINGS),
        "sources": sources,
        "benchmarks": benchmarks,
        "validation_files": _validation_listing(recipe),
        "code": code_version(__name__),
    }  # batches curated by other code are not extended, but redone


def _listing(recipe: Recipe, workdir: Path | None) -> dict[str, list[tuple[str, str]]]:
    """source -> [(path, sha256)] of every input file; a file is read again only when its
    size or mtime changed (the memo in `<workdir>/.curate-hashes/`)."""
    memo = Path(workdir or recipe.workdir) / HASH_MEMO
    return {s.name: [(str(p), memoized_sha256(p, memo)) for p in source_files(s)] for s in recipe.sources}


def _version(listing: dict[str, list[tuple[str, str]]]) -> str:
    contents = {name: sorted({sha256 for _, sha256 in files}) for name, files in listing.items()}
    return hashlib.sha256(json.dumps(contents, sort_keys=True).encode()).hexdigest()


def data_version(recipe: Recipe, workdir: Path | None = None) -> str:
    """Hash of the contents of each source's files: changes when new data arrives, not when
    files are copied again, touched or renamed. The hash cache is in workdir (default the recipe's)."""
    return _version(_listing(recipe, workdir))


def _fingerprint(settings: dict, listing: dict) -> str:
    return fingerprint("curate", {"settings": settings, "data": _version(listing)}, (), code_version(__name__))


def input_fingerprint(recipe: Recipe, workdir: Path | None = None) -> str:
    """Settings plus the contents of every input file: new data means a rerun."""
    return _fingerprint(_settings(recipe), _listing(recipe, workdir))


def _bucket(doc_id: str) -> float:
    """A document's place in [0, 1) for the hash split: a pure function of its id."""
    return int.from_bytes(hashlib.sha256(doc_id.encode()).digest()[:8], "big") / 2**64


def hash_split(
    docs: list[tuple[str, str]], spec: CurateSpec, held_chars: int = 0
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, validation): documents in id-hash order are held out while their bucket is below
    validation_fraction, then further ones until the source's validation set (held_chars from
    earlier batches included) reaches min_validation_tokens x chars_per_token characters,
    within max_validation_fraction of this batch's characters. validation_fraction 0: none."""
    if spec.validation_fraction == 0:
        return docs, []
    target = spec.min_validation_tokens * spec.chars_per_token - held_chars
    limit = spec.max_validation_fraction * sum(len(text) for _, text in docs)
    chosen, taken = set(), 0
    for doc_id, text in sorted(docs, key=lambda doc: _bucket(doc[0])):
        if _bucket(doc_id) < spec.validation_fraction or (taken < target and taken + len(text) <= limit):
            chosen.add(doc_id)
            taken += len(text)
    return [d for d in docs if d[0] not in chosen], [d for d in docs if d[0] in chosen]


def _validation_listing(recipe: Recipe) -> dict:
    """The explicit validation files of each source that has them (part of the settings: a change starts over)."""
    return {
        s.name: [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in source_files(s, s.validation_paths)]
        for s in recipe.sources
        if s.validation_paths
    }


def _read_validation(source: SourceSpec, spec: CurateSpec, db: sqlite3.Connection, out: Path) -> None:
    """A source's explicit validation files as validation-0000.parquet, bad records quarantined;
    their texts are registered so that a training copy is removed as an exact duplicate."""
    docs, quarantined = [], []
    for path in source_files(source, source.validation_paths):
        for record in read_records(path, source, spec):
            if record.reason is not None:
                quarantined.append(record.quarantine_row(source.name))
                continue
            db.execute(
                "INSERT OR IGNORE INTO texts VALUES (?, ?, ?)",
                (hashlib.sha256(record.text.encode()).hexdigest(), source.name, f"validation:{record.doc_id}"),
            )
            docs.append((record.doc_id, record.text))
    _write_parquet(out / source.name / "validation-0000.parquet", docs)
    _write_jsonl(out / "quarantine" / source.name / "validation.jsonl", quarantined)


def _validation_texts(folder: Path, source: str) -> list[str]:
    """The validation documents of a source in a curate folder (final or staging), every batch."""
    import pyarrow.parquet as pq

    files = sorted((Path(folder) / source).glob("validation-*.parquet"))
    return [text for f in files for text in pq.read_table(f, columns=["text"])["text"].to_pylist()]


def _validation_summary(folder: Path, source: SourceSpec, spec: CurateSpec) -> tuple[dict, str | None]:
    """The source's whole validation set (every batch): size, estimated tokens, and a warning
    when it is below min_validation_tokens."""
    texts = _validation_texts(folder, source.name)
    chars = sum(len(t) for t in texts)
    tokens = int(chars / spec.chars_per_token)
    summary = {
        "split": "files" if source.validation_paths else "hash",
        "docs": len(texts),
        "chars": chars,
        "estimated_tokens": tokens,
        "token_estimate": f"characters / curate.chars_per_token ({spec.chars_per_token:g})",
    }
    warning = None
    if tokens < spec.min_validation_tokens and (source.validation_paths or spec.validation_fraction > 0):
        warning = (
            f"{source.name}: validation set of {len(texts)} documents, about {tokens:,} tokens, is below "
            f"curate.min_validation_tokens {spec.min_validation_tokens:,}: its loss has a large standard error; "
            + (
                "add documents to its validation_paths"
                if source.validation_paths
                else f"the hash split stopped at max_validation_fraction {spec.max_validation_fraction:g}: give the "
                "source validation_paths or more data"
            )
        )
    return summary, warning


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    if rows:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", encoding="utf-8") as out:
            out.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def _write_parquet(path: Path, docs: list[tuple[str, str]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    schema = pa.schema([("id", pa.string()), ("text", pa.string())])  # typed even when empty
    table = pa.table({"id": [d[0] for d in docs], "text": [d[1] for d in docs]}, schema=schema)
    pq.write_table(table, path)


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


def _claim_id(db: sqlite3.Connection, source: str, record: Record) -> None:
    """The first record with an id claims it, good or bad; a later good record with that id
    becomes a duplicate_id naming the first (and whether it was kept)."""
    if record.id is None:
        return
    row = (source, record.id, record.file, record.line, record.reason)
    if db.execute("INSERT OR IGNORE INTO ids VALUES (?, ?, ?, ?, ?)", row).rowcount or record.reason is not None:
        return
    file, line, reason = db.execute("SELECT file, line, reason FROM ids WHERE source=? AND id=?", row[:2]).fetchone()
    if (file, line) == (record.file, record.line):
        return  # another piece of the same long document
    record.reason, record.excerpt = "duplicate_id", record.text[:200]
    if reason is None:
        record.kept = f"{file}:{line}"
        record.detail = f"id {record.id!r} already taken in {source} by {record.kept}, which is kept"
    else:
        record.detail = (
            f"id {record.id!r} first seen in {source} at {file}:{line}, quarantined there as {reason}; "
            "no record with this id is kept"
        )


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


def _screen_source(
    recipe: Recipe,
    source: SourceSpec,
    listed: list[tuple[str, str]],
    db: sqlite3.Connection,
    contamination: dict[tuple[str, ...], str],
) -> dict:
    """Read a source's new files: quarantine bad records, drop exact duplicates, decontaminate;
    fail if too many records are bad. Returns the clean documents."""
    spec = recipe.curate
    files, copies = _new_files(db, source, listed)
    counts: Counter[str] = Counter()
    quarantined: list[dict] = []
    removed: list[dict] = []
    clean: list[tuple[str, str]] = []
    for path, _ in files:
        for record in read_records(Path(path), source, spec):
            counts["records"] += 1  # an unreadable file counts as one bad record
            if record.part is not None:
                counts["split_parts"] += 1
            _claim_id(db, source.name, record)
            if record.reason is not None:
                counts[f"quarantined:{record.reason}"] += 1
                quarantined.append(record.quarantine_row(source.name))
                continue
            counts["chars"] += len(record.text)
            digest = hashlib.sha256(record.text.encode()).hexdigest()
            first = db.execute("SELECT source, id FROM texts WHERE hash=?", (digest,)).fetchone()
            if first is not None:
                removed.append({"id": record.doc_id, "reason": "exact_duplicate", "of": f"{first[0]}:{first[1]}"})
                continue
            db.execute("INSERT INTO texts VALUES (?, ?, ?)", (digest, source.name, record.doc_id))
            pieces, hits = decontaminate(record.doc_id, record.text, contamination, spec)
            if hits:
                cut = len(record.text) - sum(len(text) for _, text in pieces)
                counts["contaminated_docs"] += 1
                counts["contaminated_chars"] += cut
                reason = "contaminated" if spec.decontaminate == "document" else "contaminated_span"
                removed.append(
                    {"id": record.doc_id, "reason": reason, "of": hits[0], "chars": cut, "pieces": len(pieces)}
                )
            clean.extend(pieces)
    bad = sum(v for k, v in counts.items() if k.startswith("quarantined:"))
    bad_fraction = bad / counts["records"] if counts["records"] else 0.0
    if bad_fraction > spec.max_bad_fraction:
        top = Counter({k.split(":", 1)[1]: v for k, v in counts.items() if k.startswith("quarantined:")}).most_common(3)
        raise CurationError(
            f"source {source.name}: {bad_fraction:.1%} of {counts['records']} records are bad "
            f"(limit curate.max_bad_fraction {spec.max_bad_fraction:.1%}); top reasons: "
            + ", ".join(f"{reason} {n}" for reason, n in top)
            + "; previous curated output kept"
        )
    return {
        "files": files,
        "copies": copies,
        "counts": counts,
        "bad_fraction": bad_fraction,
        "quarantined": quarantined,
        "removed": removed,
        "clean": clean,
    }


def _write_source(
    source: SourceSpec,
    screened: dict,
    kept: list[tuple[str, str]],
    out: Path,
    db: sqlite3.Connection,
    batch: int,
    spec: CurateSpec,
) -> dict:
    """Write one source's batch (train/validation Parquet, quarantine, removed) and its report."""
    if source.validation_paths:  # held out by the recipe's files, not by hash
        train, validation = kept, []
    else:
        train, validation = hash_split(kept, spec, sum(map(len, _validation_texts(out, source.name))))
    removed = screened["removed"]
    _write_parquet(inside(out, source.name, f"train-{batch:04d}.parquet"), train)
    _write_parquet(inside(out, source.name, f"validation-{batch:04d}.parquet"), validation)
    _write_jsonl(inside(out / "quarantine", source.name, f"batch-{batch:04d}.jsonl"), screened["quarantined"])
    _write_jsonl(inside(out / "removed", source.name, f"batch-{batch:04d}.jsonl"), removed)
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
        "removed": dict(sorted(Counter(r["reason"] for r in removed).items())),
        "contaminated_ids": [r["id"] for r in removed if r["reason"].startswith("contaminated")],
        "contaminated_docs": counts["contaminated_docs"],
        "contaminated_chars": counts["contaminated_chars"],
        "contaminated_char_fraction": round(counts["contaminated_chars"] / max(counts["chars"], 1), 6),
        "train_docs": len(train),
        "validation_docs": len(validation),
        "train_chars": sum(len(t) for _, t in train),
    }


def _near_dedup_all(
    screened: dict[str, dict], sources: list[SourceSpec], out: Path, batch: int, recipe: Recipe
) -> dict[str, list[tuple[str, str]]]:
    """One MinHash pass over every source's clean documents in priority order; the removed
    ones are added to each source's removed list, naming the document they duplicate."""
    from refit.stages.lib.near_dedup import EARLIER_BATCH, near_dedup

    ordered = [(source.name, doc) for source in sources for doc in screened[source.name]["clean"]]
    duplicates = near_dedup(
        [text for _, (_, text) in ordered],
        out / "work",
        out / "minhash-index",
        f"batch-{batch:04d}",
        recipe.curate,
    )
    kept: dict[str, list[tuple[str, str]]] = {source.name: [] for source in sources}
    for position, (name, doc) in enumerate(ordered):
        if position not in duplicates:
            kept[name].append(doc)
            continue
        original = duplicates[position]
        of = (
            "a document of an earlier batch"
            if original == EARLIER_BATCH
            else f"{ordered[original][0]}:{ordered[original][1][0]}"
        )
        screened[name]["removed"].append({"id": doc[0], "reason": "near_duplicate", "of": of})
    return kept


def _disk_full(error: BaseException) -> bool:
    """ENOSPC or a quota, as Python, SQLite ("database or disk is full") or Arrow report it."""
    while error is not None:
        if getattr(error, "sqlite_errorcode", None) == sqlite3.SQLITE_FULL:
            return True
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


@contextmanager
def _disk_full_reported(final: Path) -> Iterator[None]:
    """A full disk anywhere in the run becomes one line naming the stage and the path."""
    try:
        yield
    except BaseException as error:
        if not _disk_full(error):
            raise
        path = getattr(error, "filename", None) or final.with_name(final.name + ".tmp")
        raise CurationError(
            f"curate: no space left on device writing {path} ({error}); "
            f"the previous curated output in {final} is unchanged"
        ) from error


def run_curate(recipe: Recipe, workdir: Path, force: bool = False) -> dict:
    """Curate every source into `<workdir>/curate/`; returns the report (also in report.json)."""
    final = Path(workdir) / FOLDER
    with _disk_full_reported(final):  # the file hashes are saved in the workdir too
        # one listing: a file arriving mid-run is the next run's
        settings, listing = _settings(recipe), _listing(recipe, workdir)
        expected = _fingerprint(settings, listing)
        if not force and is_done(final, expected):
            log.info("curate: up to date (%s)", expected[:12])
            return json.loads((final / "report.json").read_text())
        return _curate(recipe, final, force, settings, listing, expected)


def _curate(recipe: Recipe, final: Path, force: bool, settings: dict, listing: dict, expected: str) -> dict:
    started = time.time()
    settings_hash = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
    previous = read_marker(final)
    incremental = not force and previous is not None and previous.get("settings") == settings_hash
    with staged_output(final, seed_previous=incremental) as out:
        # one transaction for the run: the database only counts once swapped into place, so a
        # commit per insert (an fsync each, ~1 ms) would buy nothing
        with closing(sqlite3.connect(out / "state.sqlite")) as db:  # closed on failure too: the folder is removed
            db.executescript(SCHEMA)
            batch = (db.execute("SELECT MAX(batch) FROM files").fetchone()[0] or 0) + 1
            contamination = benchmark_ngrams(recipe.evaluate.benchmarks, recipe.curate.decontaminate_ngram)
            sources = sorted(recipe.sources, key=lambda s: ROLE_ORDER[s.role])
            for source in sources if batch == 1 else ():  # explicit validation sets: read once, before training text
                if source.validation_paths:
                    _read_validation(source, recipe.curate, db, out)
            screened = {}
            for source in sources:  # every source is screened before the (costlier) dedupe
                log.info("curate: reading %s (batch %d)", source.name, batch)
                screened[source.name] = _screen_source(recipe, source, listing[source.name], db, contamination)
            kept = _near_dedup_all(screened, sources, out, batch, recipe)
            report_sources = {
                source.name: _write_source(
                    source, screened[source.name], kept[source.name], out, db, batch, recipe.curate
                )
                for source in sources
            }
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
        write_marker(out, "curate", expected, started, code_version(__name__), extra)
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
    sections=("sources", "curate", "evaluate"),
    folder=FOLDER,
    run_function=run_curate,
    fingerprint_function=input_fingerprint,
)
