"""Reading source files record by record, with every bad record turned into a reason.

Datatrove's readers skip undecodable lines with a log message; curation needs the file,
line and reason of each one for the quarantine, so raw records are read here and only
clean documents go on to datatrove's dedupe steps.

Robust by construction: whatever one record raises while it is decoded, parsed or validated
becomes that record's quarantine row (`unreadable_record` where no named check caught it
first), and reading goes on with the next line. Whatever a file raises while it is opened,
decompressed or decoded (truncated or corrupt compression, a damaged Parquet page) ends it
with one `unreadable_file` row after the records read before the damage, which are kept.
A path that is no regular file (`file_problem`) is one row, never opened. Memory is bounded:
a line over MAX_LINE_BYTES is counted past, not held (`line_too_long`), and nesting deeper
than Python's recursion limit is refused by the JSON parser (`unparseable_json`).
"""

from __future__ import annotations

import gzip
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from refit.stages.core.config import CurateSpec, SourceSpec
from refit.stages.core.text import CONTROL, normalise

EXCERPT_CHARS = 200
DETAIL_CHARS = 500  # an exception's message can hold a whole value
BOM = b"\xef\xbb\xbf"
READ_CHUNK = 1 << 20
MAX_LINE_BYTES = 32 << 20  # a longer JSONL line is not parsed: its bytes are counted as they stream past
# compressed bytes per zstd call: zstd expands a byte at most 32768-fold (RLE blocks), so no call
# returns more than 32 MiB, whatever the file (one call per 1 MiB read could return gigabytes)
ZSTD_STEP = 1 << 10
PARQUET_BATCH = 4096
KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket"}
KINDS |= {stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}


@dataclass
class Record:
    """One record of a source file: a clean document (text set) or a bad one (reason set)."""

    file: str
    line: int  # 1-based line (JSONL) or row (Parquet); for a file's own row, the first not read
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


class Unparsed(NamedTuple):
    """A record the reader could not hand over to be parsed, with why."""

    reason: str
    detail: str
    head: bytes  # its first bytes, for the excerpt


def file_problem(path: Path) -> Record | None:
    """The quarantine row of a path a source's pattern matched that cannot be read as a file
    (a name that is not UTF-8, a broken link, a directory, a FIFO...), or None for a regular file."""
    name = os.fsencode(path).decode("utf-8", "backslashreplace")  # a name's undecodable bytes escaped
    if name != str(path):
        problem = "file_name_not_utf8", "reports and the state database name files as text: rename it"
    else:
        problem = _not_a_file(path)
    return None if problem is None else _bad(Record(name, 1), *problem, "")


def unreadable(path: Path, error: BaseException, line: int = 0) -> Record:
    """The quarantine row of a file that could not be read past `line` (0: not at all)."""
    return _bad(Record(str(path), line + 1), "unreadable_file", f"unreadable after line {line}: {_error(error)}", "")


def _not_a_file(path: Path) -> tuple[str, str] | None:
    try:
        kind = stat.S_IFMT(os.stat(path).st_mode)
    except FileNotFoundError:
        if os.path.islink(path):
            return "broken_link", f"a link to {os.path.realpath(path)}, which does not exist"
        return "unreadable_file", "it is gone"
    except OSError as error:  # a link loop, a folder on the way that cannot be searched
        return "unreadable_file", _error(error)
    return None if kind == stat.S_IFREG else ("not_a_file", KINDS.get(kind, f"file type {kind:o}"))


def _zstd_blocks(handle) -> Iterator[bytes]:
    """Decompressed data of every frame of a .zst file. python-zstandard's stream reader
    stops silently where a file was cut and reads only the first frame; a cut inside a
    frame raises EOFError here."""
    import zstandard

    decompressor = zstandard.ZstdDecompressor()
    frame, in_frame = decompressor.decompressobj(), False
    while chunk := handle.read(READ_CHUNK):
        for start in range(0, len(chunk), ZSTD_STEP):
            data = chunk[start : start + ZSTD_STEP]
            while data:
                in_frame = True
                yield frame.decompress(data)
                if not frame.eof:
                    break
                data, frame, in_frame = frame.unused_data, decompressor.decompressobj(), False
    if in_frame:
        raise EOFError("zstd stream ended inside a frame (truncated file)")


def _head(pieces: list[bytes]) -> bytes:
    """The first EXCERPT_CHARS bytes of a line read in pieces, without joining them all."""
    head = b""
    for piece in pieces:
        if len(head) >= EXCERPT_CHARS:
            break
        head += piece[: EXCERPT_CHARS - len(head)]
    return head


def _line(pieces: list[bytes], size: int, over: bool) -> bytes | Unparsed:
    if over or size > MAX_LINE_BYTES:
        detail = f"a line of {size:,} bytes, over the limit of {MAX_LINE_BYTES:,}: not parsed"
        return Unparsed("line_too_long", detail, _head(pieces))
    return pieces[0] if len(pieces) == 1 else b"".join(pieces)


def _split_lines(blocks: Iterator[bytes]) -> Iterator[bytes | Unparsed]:
    """The lines of a byte stream, without their newline; a line over MAX_LINE_BYTES comes as
    Unparsed, its bytes dropped as they are read."""
    pieces: list[bytes] = []  # the line being read; once it is over the cap, only its first bytes
    size, over = 0, False
    for block in blocks:
        *ends, rest = block.split(b"\n")
        for piece in ends:
            pieces.append(piece)
            yield _line(pieces, size + len(piece), over)
            pieces, size, over = [], 0, False
        size += len(rest)
        if not over:
            pieces.append(rest)
            if size > MAX_LINE_BYTES:
                pieces, over = [_head(pieces)], True
    if size:
        yield _line(pieces, size, over)


def _jsonl_lines(path: Path) -> Iterator[bytes | Unparsed]:
    with open(path, "rb") as raw, gzip.open(raw) if path.suffix == ".gz" else raw as handle:
        if path.suffix == ".zst":
            yield from _split_lines(_zstd_blocks(handle))
        else:  # read1: what was decompressed before a truncated gzip's end still comes out
            yield from _split_lines(iter(lambda: handle.read1(READ_CHUNK), b""))


def _parquet_items(batch) -> list[dict | Unparsed]:
    """The rows of a record batch as dicts; a value Python cannot hold (a timestamp past year
    9999) makes its own row Unparsed, not the batch's."""
    try:
        return batch.to_pylist()
    except Exception:
        items: list[dict | Unparsed] = []
        for row in range(batch.num_rows):
            try:
                items.append(batch.slice(row, 1).to_pylist()[0])
            except Exception as error:
                items.append(Unparsed("unreadable_record", _error(error), b""))
        return items


def _raw_rows(path: Path, source: SourceSpec) -> Iterator[tuple[int, bytes | dict | Unparsed | None]]:
    """(line, raw bytes) for JSONL, None for a blank line (no record, but read); (row, dict of
    the id and text fields) for Parquet."""
    if source.format == "parquet":
        import pyarrow.parquet as pq

        parquet, row = pq.ParquetFile(path, buffer_size=READ_CHUNK, pre_buffer=False), 0  # never a whole column chunk
        names = parquet.schema_arrow.names
        columns = [name for name in dict.fromkeys((source.id_field, source.text_field)) if name in names]
        for group in range(parquet.num_row_groups):  # one by one: a damaged group keeps the ones before it
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH, row_groups=[group], columns=columns):
                for item in _parquet_items(batch):
                    row += 1
                    yield row, item
        return
    for number, line in enumerate(_jsonl_lines(path), start=1):
        if isinstance(line, Unparsed):
            yield number, line
            continue
        if number == 1 and line.startswith(BOM):  # written by some editors and Windows tools
            line = line[len(BOM) :]
        yield number, line if line.strip() else None


def _error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}"


def _printable(text: str) -> str:
    """Text safe to write as UTF-8: lone surrogates (from JSON escapes) become backslash escapes."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _excerpt(raw: object) -> str:
    if isinstance(raw, bytes):
        return raw[: 4 * EXCERPT_CHARS].decode("utf-8", "backslashreplace")[:EXCERPT_CHARS]
    return str(raw)[:EXCERPT_CHARS]


def _bad(record: Record, reason: str, detail: str, raw: object) -> Record:
    record.reason, record.detail = reason, _printable(detail[:DETAIL_CHARS])
    record.excerpt = _printable(_excerpt(raw))
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
    A file that breaks off (truncated, corrupt) ends with one `unreadable_file` record; a path
    that is no regular file is that one record (`file_problem`). Raises nothing a file holds."""
    path = Path(path)
    if (problem := file_problem(path)) is not None:
        yield problem
        return
    rows, line = _raw_rows(path, source), 0
    while True:
        try:
            line, raw = next(rows)
        except StopIteration:
            return
        except Exception as error:  # opening, decompressing, a damaged page: the file ends here
            yield unreadable(path, error, line)
            return
        if raw is not None:
            yield from _records(Record(str(path), line), raw, source, curate)


def _records(record: Record, raw: bytes | dict | Unparsed, source: SourceSpec, curate: CurateSpec) -> list[Record]:
    """The documents of one raw record, or its quarantine row, whatever it raises: all of them
    are made before any is handed on, so that a record is never both kept and quarantined."""
    try:
        return list(_parse(record, raw, source, curate))
    except Exception as error:
        return [_bad(Record(record.file, record.line), "unreadable_record", _error(error), raw)]


def _parse(record: Record, raw: bytes | dict | Unparsed, source: SourceSpec, curate: CurateSpec) -> Iterator[Record]:
    if isinstance(raw, Unparsed):
        yield _bad(record, raw.reason, raw.detail, raw.head)
        return
    if isinstance(raw, bytes):
        try:
            decoded = raw.decode("utf-8")
        except UnicodeDecodeError as error:
            yield _bad(record, "invalid_utf8", f"byte {error.start}: {error.reason}", raw)
            return
        try:
            raw = json.loads(decoded)
        except json.JSONDecodeError as error:
            yield _bad(record, "not_json", error.msg, decoded)
            return
        except (RecursionError, ValueError) as error:  # JSON that Python's parser caps: nesting, long integers
            yield _bad(record, "unparseable_json", _error(error), decoded)
            return
        if not isinstance(raw, dict):
            yield _bad(record, "not_json_object", f"a JSON {type(raw).__name__}", decoded)
            return
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
