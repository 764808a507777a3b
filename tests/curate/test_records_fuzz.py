"""Generated inputs never make curate's record reader, its file listing, or the loaders of
benchmark and probe files raise (property-based, Hypothesis): random bytes, valid and invalid
UTF-8, JSON values of any nesting and size, numbers of any length, BOMs, both line endings,
empty and over-long lines, each compression curate reads (whole, truncated at a random byte,
with random bytes flipped), Parquet of any column type, and folders of random names and
kinds. Every input line is accounted for exactly once (kept, quarantined, or in the damaged
tail the file's row names), a kept text is what a strict decoder reads in its line, and a
bad benchmark or probe item is an InputFileError naming file and line.

benchmarks/fuzz_records.py runs the same generators and checks on many more examples."""

from __future__ import annotations

import gzip
import io
import json
import os
import tempfile
import zlib
from collections import Counter
from pathlib import Path
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from conftest import BBQ_ITEM
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from refit.stages.core.config import CurateSpec, SourceSpec
from refit.stages.core.input_files import InputFileError, load_benchmark
from refit.stages.core.text import normalise
from refit.stages.curate import records
from refit.stages.curate.records import BOM, read_records
from refit.stages.curate.stage import source_files
from refit.stages.evaluate import safety_probes as safety

SOURCE = SourceSpec(name="s", paths=["unused"], role="new")
PARQUET = SOURCE.model_copy(update={"format": "parquet"})
CURATE = CurateSpec(min_chars=1, max_chars=80)  # short pieces: long texts are split
LINE_CAP = 16384  # records.MAX_LINE_BYTES while fuzzing: over-long lines are cheap to make
EXAMPLES = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)

# ----------------------------------------------------------------------------- generators


class Number(str):
    """JSON number text of any length and magnitude, written as is."""


# small, and around the limits of Python's parser: nesting ~1000 deep, integers of 4300 digits
DEPTHS = st.one_of(st.integers(0, 9), st.integers(900, 3000))
LENGTHS = st.one_of(st.integers(1, 30), st.integers(4000, 5000))
TEXT = st.text(alphabet=st.characters(codec=None), max_size=120)  # lone surrogates included
NUMBERS = st.one_of(
    st.integers(),
    st.floats(allow_nan=True, allow_infinity=True),  # json writes NaN and Infinity, which it reads back
    st.builds(lambda digits, sign: Number(sign + "9" * digits), LENGTHS, st.sampled_from(["", "-"])),
    st.sampled_from([Number("1e999999"), Number("-0.0e-99999"), Number("1" + "0" * 300 + ".5")]),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), NUMBERS, TEXT),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=10,
)


def dumps(value, ascii_only: bool) -> str:
    if isinstance(value, Number):
        return str(value)
    if isinstance(value, list):
        return "[" + ", ".join(dumps(v, ascii_only) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)}: {dumps(v, ascii_only)}" for k, v in value.items()) + "}"
    return json.dumps(value, ensure_ascii=ascii_only)


@st.composite
def json_lines(draw, value) -> bytes:
    """A value as one JSON line, its lone surrogates escaped or written raw (invalid UTF-8)."""
    ascii_only = draw(st.booleans())
    return dumps(draw(value), ascii_only).encode("utf-8", "surrogatepass")


DOCUMENTS = st.fixed_dictionaries({"id": st.one_of(TEXT, st.integers()), "text": TEXT})
FIELDS = st.fixed_dictionaries({}, optional={"id": JSON_VALUES, "text": JSON_VALUES})
LINES = st.one_of(
    json_lines(DOCUMENTS),
    json_lines(DOCUMENTS),  # twice: most lines of a real file are good
    json_lines(FIELDS),
    json_lines(JSON_VALUES),
    st.binary(max_size=60),
    DEPTHS.map(lambda n: b'{"id": "deep", "text": ' + b"[" * n + b"]" * n + b"}"),
    DEPTHS.map(lambda n: b'{"id": ' + b'{"a": ' * n + b"1" + b"}" * n + b', "text": "nested"}'),
    st.integers(LINE_CAP - 40, 2 * LINE_CAP).map(lambda n: b'{"id": "long", "text": "' + b"x" * n + b'"}'),
    st.sampled_from([b"", b"  ", b"\t", b"\r", BOM, b"\xef\xbb", b"\x00"]),
)


@st.composite
def jsonl_data(draw) -> bytes:
    data = b""
    for line in draw(st.lists(LINES, max_size=25)):
        data += line + draw(st.sampled_from([b"\n", b"\r\n"]))
    if draw(st.booleans()):
        data = data.rstrip(b"\r\n")  # no line ending after the last line
    return (BOM if draw(st.booleans()) else b"") + data


def zstd_frames(data: bytes, cuts: list[int], checksum: bool) -> bytes:
    """data as one zstd frame per piece between the cuts (as concatenated .zst files are)."""
    compressor = zstandard.ZstdCompressor(write_checksum=checksum)
    bounds = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return b"".join(compressor.compress(data[a:b]) for a, b in zip(bounds, bounds[1:]))


@st.composite
def damaged(draw, blob: bytes) -> tuple[str, bytes]:
    """(how, blob whole, truncated at a random byte, or with random bytes flipped)."""
    how = draw(st.sampled_from(["whole", "truncated", "flipped"]))
    if how == "truncated":
        return how, blob[: draw(st.integers(0, max(len(blob) - 1, 0)))]
    if how == "flipped" and blob:
        flipped = bytearray(blob)
        for at in draw(st.lists(st.integers(0, len(blob) - 1), min_size=1, max_size=4)):
            flipped[at] ^= draw(st.integers(1, 255))
        return how, bytes(flipped)
    return "whole", blob


@st.composite
def jsonl_files(draw) -> tuple[str, bytes, str, bytes]:
    """(suffix, uncompressed data, how damaged, file bytes)."""
    data, suffix = draw(jsonl_data()), draw(st.sampled_from([".jsonl", ".jsonl.gz", ".jsonl.zst"]))
    if suffix == ".jsonl.gz":
        blob = gzip.compress(data)
    elif suffix == ".jsonl.zst":
        blob = zstd_frames(data, draw(st.lists(st.integers(0, 1 << 16), max_size=2)), draw(st.booleans()))
    else:
        blob = data
    how, blob = draw(damaged(blob))
    return suffix, data, how, blob


# ----------------------------------------------------------------------------- checks


def strict(line: bytes):
    """The JSON object a strict decoder reads in a line, or None where it reads none."""
    if len(line) > records.MAX_LINE_BYTES:
        return None
    try:
        value = json.loads(line.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def lines_of(data: bytes) -> dict[int, bytes]:
    """line number -> line of every record in JSONL data: blank lines are none."""
    lines = data.split(b"\n")
    lines[0] = lines[0].removeprefix(BOM)
    return {number: line for number, line in enumerate(lines, 1) if line.strip()}


def strict_decompress(suffix: str, blob: bytes) -> tuple[bytes, bool]:
    """(what a strict decompressor reads of a file, whether it reached the stream's end)."""
    if suffix == ".jsonl.gz" and blob:  # Python's gzip reads an empty file as an empty stream
        stream = zlib.decompressobj(31)
        return stream.decompress(blob), stream.eof
    if suffix == ".jsonl.zst":
        data = b""
        while blob:
            frame = zstandard.ZstdDecompressor().decompressobj()
            try:
                data += frame.decompress(blob)
            except zstandard.ZstdError:  # a frame header cut short
                return data, False
            if not frame.eof:
                return data, False
            blob = frame.unused_data
        return data, True
    return blob, True


def check_rows(rows: list, lines: dict[int, bytes] | None, tail: int | None) -> Counter:
    """Rows in line order, each line once (a split record's pieces in order), and at most one
    row for the file itself, last. With `lines` (the file's records), every line before the
    damaged tail (from line `tail` on; None: no damage) is accounted for, and each kept text
    is what a strict decoder reads in its line. Returns the rows' counts by reason."""
    unreadable = [row for row in rows if row.reason == "unreadable_file"]
    by_line: dict[int, list] = {}
    for row in rows[: len(rows) - len(unreadable)]:
        assert not by_line or row.line >= max(by_line), "rows out of line order"
        by_line.setdefault(row.line, []).append(row)
        json.dumps(row.quarantine_row("s"), ensure_ascii=False).encode("utf-8")  # as read_file writes it
    assert len(unreadable) <= 1 and rows[len(rows) - len(unreadable) :] == unreadable
    assert not unreadable or not by_line or unreadable[0].line > max(by_line)
    for group in by_line.values():
        parts = [row.part for row in group if row.reason is None]
        assert len(group) == 1 and group[0].reason or parts in ([None], list(range(len(group)))), group
    if lines is not None:
        assert [row.line for row in unreadable] == ([] if tail is None else [tail])
        assert set(by_line) == {n for n in lines if tail is None or n < tail}
        for line, group in by_line.items():
            value = strict(lines[line])
            if group[0].reason is None:
                assert value is not None and isinstance(value.get("text"), str), f"line {line}: kept, no text read"
                text = normalise(value["text"])
                assert all(row.text == text if row.part is None else row.text in text for row in group)
    return Counter(row.reason or "kept" for row in rows)


def check_jsonl(folder: Path, suffix: str, data: bytes, how: str, blob: bytes) -> Counter:
    """Read one generated JSONL file and check its rows; returns their counts."""
    path = folder / f"records{suffix}"
    path.write_bytes(blob)
    with mock.patch.object(records, "MAX_LINE_BYTES", LINE_CAP):
        rows = list(read_records(path, SOURCE, CURATE))
        if suffix == ".jsonl":  # a damaged plain file is just other data
            return check_rows(rows, lines_of(blob), None)
        if how == "flipped":  # what it decompresses to is anyone's guess: the structure is checked
            return check_rows(rows, None, None)
        read, complete = strict_decompress(suffix, blob)
        return check_rows(rows, lines_of(read), None if complete else read.count(b"\n") + 1)


@given(file=jsonl_files())
@settings(EXAMPLES, max_examples=150)
def test_every_line_of_a_generated_jsonl_file_is_kept_or_quarantined_once(tmp_path, file):
    check_jsonl(tmp_path, *file)


@st.composite
def parquet_files(draw) -> tuple[list, str, bytes]:
    """(the text column's values, how damaged, file bytes) of a Parquet file whose id and text
    columns have random types (or are absent)."""
    rows = draw(st.integers(0, 20))
    texts = {
        "string": st.one_of(st.text(max_size=100), st.text(max_size=100), st.none()),
        "binary": st.binary(max_size=20),
        "int64": st.integers(-(2**63), 2**63 - 1),
        "list": st.lists(st.text(max_size=5), max_size=3),
        "timestamp": st.integers(-(2**52), 2**52),  # in seconds: most beyond what Python's datetime holds
    }
    kind = draw(st.sampled_from([*texts, "absent"]))
    columns = {}
    if draw(st.sampled_from([True, True, False])):
        ids = st.one_of(st.text(min_size=1, max_size=8), st.text(min_size=1, max_size=8), st.none())
        columns["id"] = pa.array(draw(st.lists(ids, min_size=rows, max_size=rows)))
    values = draw(st.lists(texts.get(kind, st.none()), min_size=rows, max_size=rows))
    if kind != "absent":
        columns["text"] = pa.array(values, pa.timestamp("s") if kind == "timestamp" else None)
    sink = io.BytesIO()
    pq.write_table(pa.table(columns or {"other": pa.array([0] * rows)}), sink, row_group_size=draw(st.integers(1, 8)))
    how, blob = draw(damaged(sink.getvalue()))
    return values if kind == "string" else [None] * rows, how, blob


def check_parquet(folder: Path, texts: list, how: str, blob: bytes) -> Counter:
    path = folder / "records.parquet"
    path.write_bytes(blob)
    rows = list(read_records(path, PARQUET, CURATE))
    lines = {n: json.dumps({"text": text}).encode() for n, text in enumerate(texts, 1)}
    return check_rows(rows, lines if how == "whole" else None, None)


@given(file=parquet_files())
@settings(EXAMPLES)
def test_every_row_of_a_generated_parquet_file_is_kept_or_quarantined_once(tmp_path, file):
    check_parquet(tmp_path, *file)


# ----------------------------------------------------------------------------- the listing

OUTCOMES = {  # kind of entry -> what listing it gives: a file to read, or the reason of its row
    "file": "file",
    "link to file": "file",
    "folder": "not_a_file",
    "link to folder": "not_a_file",
    "fifo": "not_a_file",
    "device": "not_a_file",
    "broken link": "broken_link",
    "link loop": "unreadable_file",
}


@st.composite
def folders(draw) -> dict[bytes, str]:
    """Names (any bytes but / and NUL, not hidden) -> kinds of the entries of a folder."""
    names = st.one_of(st.text(min_size=1, max_size=12).map(os.fsencode), st.binary(min_size=1, max_size=12))
    names = names.filter(lambda n: b"/" not in n and b"\0" not in n and n[:1] != b".")
    return draw(st.dictionaries(names, st.sampled_from(sorted(OUTCOMES)), max_size=8))


def make_entry(path: bytes, kind: str, empty: Path) -> None:
    if kind == "file":
        Path(os.fsdecode(path)).write_bytes(b'{"id": "a", "text": "a document"}\n')
    elif kind == "folder":
        os.mkdir(path)
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        targets = {"link to file": __file__, "link to folder": empty, "device": os.devnull, "link loop": path}
        os.symlink(targets.get(kind, "/no/such/file"), path)


def check_listing(tmp: Path, entries: dict[bytes, str], recursive: bool) -> Counter:
    """Every entry a pattern matches is read (and reading it raises nothing) or is one row with
    its reason, but the folders a pattern ending in `**` walks through. Returns the counts."""
    folder, empty = Path(tempfile.mkdtemp(dir=tmp)), Path(tempfile.mkdtemp(dir=tmp))
    expected = Counter()
    for name, kind in entries.items():
        path = os.path.join(os.fsencode(folder), name)
        make_entry(path, kind, empty)
        try:
            outcome = path.decode("utf-8") and OUTCOMES[kind]
        except UnicodeDecodeError:
            outcome = "file_name_not_utf8"
        if not (recursive and kind in ("folder", "link to folder")):
            expected[path.decode("utf-8", "backslashreplace"), outcome] += 1
    source = SourceSpec(name="s", paths=[str(folder / ("**" if recursive else "*"))], role="new")
    files, problems = source_files(source)
    assert Counter([(str(p), "file") for p in files] + [(row.file, row.reason) for row in problems]) == expected
    for path in files:
        list(read_records(path, SOURCE, CURATE))
    return Counter(row.reason for row in problems) + Counter(file=len(files))


@given(entries=folders(), recursive=st.booleans())
@settings(EXAMPLES)
def test_every_path_a_pattern_matches_is_read_or_reported(tmp_path, entries, recursive):
    check_listing(tmp_path, entries, recursive)


# ----------------------------------------------------------------------------- benchmark and probe files

BENCH_ITEM = {"id": "q", "query": "The query", "choices": [" a", " b"], "gold": 1}
CROWS = ",sent_more,sent_less,stereo_antistereo,bias_type\n0,Old is slow.,Young is slow.,stereo,age\n"
ITEM_FIELDS = st.dictionaries(st.sampled_from(sorted({*BENCH_ITEM, *BBQ_ITEM, "text"})), JSON_VALUES, max_size=4)
SUSPECTS = st.one_of(
    st.builds(lambda base, changes: {**base, **changes}, st.sampled_from([BENCH_ITEM, BBQ_ITEM]), ITEM_FIELDS).flatmap(
        lambda item: json_lines(st.just(item))
    ),
    json_lines(JSON_VALUES),
    st.binary(max_size=40),
    DEPTHS.map(lambda n: b"[" * n + b"]" * n),
)
LOADERS = {  # loader, a good line of its files ("{n}": the line's own number, for ids that must not repeat)
    "benchmark": (load_benchmark, json.dumps(BENCH_ITEM | {"id": "good {n}"}).encode()),
    "bbq": (lambda path: safety.load_bbq([path]), json.dumps(BBQ_ITEM).encode()),
    "prompts": (safety.load_prompts, b'{"id": "p", "text": "Once upon a time"}'),
    "word list": (safety.load_word_list, b"word"),
    "crows pairs": (safety.load_crows_pairs, CROWS.splitlines()[1].encode()),
}


def check_loader(folder: Path, loader: str, before: int, suspect: bytes, after: int, gz: bool) -> str:
    """Good lines around one suspect line: the file loads, or the error names the file and the
    suspect's line (for CSV, where a quote can run on to the end, a line from it on)."""
    load, good, suspect = *LOADERS[loader], suspect.replace(b"\n", b" ")  # one line
    header = CROWS.splitlines()[0].encode() + b"\n" if loader == "crows pairs" else b""
    goods = [good.replace(b"{n}", b"%d" % n) for n in range(before + after)]
    data = header + b"".join(line + b"\n" for line in goods[:before] + [suspect] + goods[before:])
    path = folder / f"items.txt{'.gz' if gz else ''}"
    path.write_bytes(gzip.compress(data) if gz else data)
    first = before + 1 + bool(header)
    try:
        load(path)
    except InputFileError as error:
        where, _, _ = str(error).partition(": ")
        assert where.startswith(f"{path}, line "), error
        line = int(where.rsplit(" ", 1)[1])
        repeats_suspect = f"repeats line {first}" in str(error)  # a later good line with the suspect's id
        assert (
            line == first
            or repeats_suspect
            or loader == "crows pairs"
            and line >= first
            or not suspect.strip()
            and line == 1
        ), error
        return "refused"
    return "loaded"


# check_loader's arguments but the folder: which loader, good lines before and after the suspect, gzipped or not
LOADER_INPUTS = {
    "loader": st.sampled_from(sorted(LOADERS)),
    "before": st.integers(0, 3),
    "suspect": SUSPECTS,
    "after": st.integers(0, 3),
    "gz": st.booleans(),
}


@given(**LOADER_INPUTS)
@settings(EXAMPLES, max_examples=150)
def test_a_bad_benchmark_or_probe_item_is_an_error_naming_its_file_and_line(
    tmp_path, loader, before, suspect, after, gz
):
    check_loader(tmp_path, loader, before, suspect, after, gz)
