"""Reading source files record by record, with every bad record turned into a reason.

Datatrove's readers skip undecodable lines with a log message; curation needs the file,
line and reason of each one for the quarantine, so raw records are read here and only
clean documents go on to datatrove's dedupe steps.
"""

from __future__ import annotations

import gzip
import io
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from refit.stages.lib.config import CurateSpec, SourceSpec
from refit.stages.lib.text import CONTROL, normalise

EXCERPT_CHARS = 200


@dataclass
class Record:
    """One record of a source file: a clean document (text set) or a bad one (reason set)."""

    file: str
    line: int  # 1-based line (JSONL) or row (Parquet)
    id: str | None = None
    text: str | None = None
    reason: str | None = None
    detail: str = ""
    excerpt: str = ""
    part: int | None = None  # index of the piece when a long document was split

    def quarantine_row(self, source: str) -> dict:
        return {
            "source": source,
            "file": self.file,
            "line": self.line,
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "excerpt": self.excerpt,
        }


def _open_binary(path: Path) -> io.BufferedIOBase:
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    if path.suffix == ".zst":
        import zstandard

        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(open(path, "rb")))
    return open(path, "rb")


def _raw_rows(path: Path, fmt: str) -> Iterator[tuple[int, bytes | dict]]:
    """(line, raw bytes) for JSONL, (row, dict) for Parquet."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for item in batch.to_pylist():
                row += 1
                yield row, item
        return
    with _open_binary(path) as handle:
        for number, line in enumerate(handle, start=1):
            if line.strip():
                yield number, line


def _bad(record: Record, reason: str, detail: str, raw: object) -> Record:
    record.reason, record.detail = reason, detail
    record.excerpt = (raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw))[:EXCERPT_CHARS]
    return record


def read_records(path: Path, source: SourceSpec, curate: CurateSpec) -> Iterator[Record]:
    """Every record of one file, validated and normalised; long documents split when asked."""
    for line, raw in _raw_rows(path, source.format):
        record = Record(file=str(path), line=line)
        if isinstance(raw, bytes):
            try:
                decoded = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                yield _bad(record, "invalid_utf8", f"byte {error.start}: {error.reason}", raw)
                continue
            try:
                raw = json.loads(decoded)
            except json.JSONDecodeError as error:
                yield _bad(record, "not_json", error.msg, decoded)
                continue
            if not isinstance(raw, dict):
                yield _bad(record, "not_json_object", f"a JSON {type(raw).__name__}", decoded)
                continue
        yield from _validate(record, raw, source, curate)


def _validate(record: Record, item: dict, source: SourceSpec, curate: CurateSpec) -> Iterator[Record]:
    if source.id_field is not None:
        value = item.get(source.id_field)
        if value is None or value == "":
            yield _bad(record, "missing_id", f"no {source.id_field!r} field", item)
            return
        record.id = str(value)
    else:
        record.id = f"{Path(record.file).name}:{record.line}"
    text = item.get(source.text_field)
    if text is None:
        yield _bad(record, "missing_text", f"no {source.text_field!r} field", item)
        return
    if not isinstance(text, str):
        yield _bad(record, "text_not_string", f"{source.text_field!r} is a {type(text).__name__}", item)
        return
    if (match := CONTROL.search(text)) is not None:
        yield _bad(record, "control_characters", f"U+{ord(match.group()):04X} at offset {match.start()}", text)
        return
    text = normalise(text)
    if not text:
        yield _bad(record, "empty_text", "nothing but whitespace", item)
    elif len(text) < curate.min_chars:
        yield _bad(record, "too_short", f"{len(text)} < min_chars {curate.min_chars}", text)
    elif len(text) > curate.max_chars and curate.long_documents == "quarantine":
        yield _bad(record, "too_long", f"{len(text)} > max_chars {curate.max_chars}", text)
    elif len(text) > curate.max_chars:
        for part, piece in enumerate(split_long(text, curate.max_chars)):
            yield Record(file=record.file, line=record.line, id=f"{record.id}#part{part}", text=piece, part=part)
    else:
        record.text = text
        yield record


def split_long(text: str, max_chars: int) -> list[str]:
    """Cut at paragraph, then line, then hard boundaries into pieces of at most max_chars."""
    pieces: list[str] = []
    current = ""
    for paragraph in text.split("\n\n"):
        candidate = f"{current}\n\n{paragraph}" if current else paragraph
        if len(candidate) <= max_chars:
            current = candidate
            continue
        if current:
            pieces.append(current)
        while len(paragraph) > max_chars:
            cut = paragraph.rfind("\n", 0, max_chars)
            cut = cut if cut > 0 else max_chars
            pieces.append(paragraph[:cut].strip())
            paragraph = paragraph[cut:].strip()
        current = paragraph
    if current:
        pieces.append(current)
    return [p for p in pieces if p]
