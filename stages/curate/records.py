"""Reading source files record by record, with every bad record turned into a reason.

Datatrove's readers skip undecodable lines with a log message; curation needs the file,
line and reason of each one for the quarantine, so raw records are read here and only
clean documents go on to datatrove's dedupe steps. A file that cannot be read to its end
(truncated or corrupt compression, a damaged Parquet page) keeps the records read before
the damage and yields one more bad record for the file itself (`unreadable_file`).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from refit.stages.core.config import CurateSpec, SourceSpec
from refit.stages.core.text import CONTROL, normalise

EXCERPT_CHARS = 200
BOM = b"\xef\xbb\xbf"
READ_CHUNK = 1 << 20


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
    kept: str | None = None  # duplicate_id: "file:line" of the record kept under that id, if any

    @property
    def doc_id(self) -> str | None:
        """The id of the curated document: the record's id, with the piece's index when split."""
        return self.id if self.part is None else f"{self.id}#part{self.part}"

    def quarantine_row(self, source: str) -> dict:
        row = {
            "source": source,
            "file": self.file,
            "line": self.line,
            "id": self.id,
            "reason": self.reason,
            "detail": self.detail,
            "excerpt": self.excerpt,
        }
        return row | {"kept": self.kept} if self.reason == "duplicate_id" else row


def _zstd_blocks(handle) -> Iterator[bytes]:
    """Decompressed data of every frame of a .zst file. python-zstandard's stream reader
    stops silently where a file was cut and reads only the first frame; a cut inside a
    frame raises EOFError here."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    while data := handle.read(READ_CHUNK):
        while data:
            in_frame = True
            yield frame.decompress(data)
            if not frame.eof:
                break
            data, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
    if in_frame:
        raise EOFError("zstd stream ended inside a frame (truncated file)")


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes]:
    pending = b""
    for block in blocks:
        *lines, pending = (pending + block).split(b"\n")
        yield from lines
    if pending:
        yield pending


def _jsonl_lines(path: Path) -> Iterator[bytes]:
    if path.suffix == ".zst":
        with open(path, "rb") as handle:
            yield from _split_lines(_zstd_blocks(handle))
        return
    with gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb") as handle:
        yield from handle


def _raw_rows(path: Path, fmt: str) -> Iterator[tuple[int, bytes | dict]]:
    """(line, raw bytes) for JSONL, (row, dict) for Parquet."""
    if fmt == "parquet":
        import pyarrow.parquet as pq

        parquet, row = pq.ParquetFile(path, buffer_size=READ_CHUNK, pre_buffer=False), 0  # never a whole column chunk
        for group in range(parquet.num_row_groups):  # one by one: a damaged group keeps the ones before it
            for batch in parquet.iter_batches(batch_size=4096, row_groups=[group]):
                for item in batch.to_pylist():
                    row += 1
                    yield row, item
        return
    for number, line in enumerate(_jsonl_lines(path), start=1):
        if number == 1 and line.startswith(BOM):  # written by some editors and Windows tools
            line = line[len(BOM) :]
        if line.strip():
            yield number, line


# what reading a damaged file raises: truncated gzip (EOFError), bad gzip CRC or header
# (BadGzipFile, an OSError), bad deflate data (zlib.error), bad zstd data (ZstdError),
# a damaged Parquet footer (ArrowInvalid, a ValueError) or page (OSError)
def _read_errors() -> tuple[type[BaseException], ...]:
    import zstandard

    return (EOFError, OSError, ValueError, zlib.error, zstandard.ZstdError)


def _printable(text: str) -> str:
    """Text safe to write as UTF-8: lone surrogates (from JSON escapes) become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _bad(record: Record, reason: str, detail: str, raw: object) -> Record:
    record.reason, record.detail = reason, _printable(detail)
    text = raw.decode("utf-8", "backslashreplace") if isinstance(raw, bytes) else str(raw)
    record.excerpt = _printable(text[:EXCERPT_CHARS])
    return record


def _lone_surrogate(text: str) -> str | None:
    """Where text cannot be encoded as UTF-8 (a lone surrogate, which JSON can escape), or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        return f"lone surrogate U+{ord(text[error.start]):04X} at offset {error.start}"
    return None


def read_records(path: Path, source: SourceSpec, curate: CurateSpec) -> Iterator[Record]:
    """Every record of one file, validated and normalised; long documents split when asked.
    A file that breaks off (truncated, corrupt) ends with one `unreadable_file` record."""
    rows, line = _raw_rows(path, source.format), 0
    while True:
        try:
            line, raw = next(rows)
        except StopIteration:
            return
        except _read_errors() as error:
            record = Record(file=str(path), line=line + 1)
            detail = f"unreadable after line {line}: {type(error).__name__}: {error}"
            yield _bad(record, "unreadable_file", detail, "")
            return
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
            state = "absent" if source.id_field not in item else "null" if value is None else "empty"
            yield _bad(record, "missing_id", f"{source.id_field!r} is {state}", item)
            return
        if (where := _lone_surrogate(str(value))) is not None:
            yield _bad(record, "invalid_unicode", f"{source.id_field!r}: {where}", item)
            return
        record.id = str(value)
    else:
        record.id = f"{Path(record.file).name}:{record.line}"
    if source.text_field not in item:
        yield _bad(record, "missing_text", f"no {source.text_field!r} field", item)
        return
    text = item[source.text_field]
    if text is None:
        yield _bad(record, "null_text", f"{source.text_field!r} is null", item)
        return
    if not isinstance(text, str):
        yield _bad(record, "text_not_string", f"{source.text_field!r} is a {type(text).__name__}", item)
        return
    if (where := _lone_surrogate(text)) is not None:
        yield _bad(record, "invalid_unicode", f"{source.text_field!r}: {where}", text)
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
            yield Record(file=record.file, line=record.line, id=record.id, text=piece, part=part)
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
