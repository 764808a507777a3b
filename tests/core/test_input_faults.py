"""Regression tests, one per fault that fuzzing the input readers found (tests/curate/test_records_fuzz.py,
benchmarks/fuzz_records.py): each is named after the input, and checks that it is now a
quarantine row with its reason (source files) or an error naming file and line (benchmark and
probe files), instead of a traceback, a skipped path, a hang or unbounded memory."""

from __future__ import annotations

import gzip
import io
import json
import os
import re
import tracemalloc
import zlib
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import BBQ_ITEM, NEW, make_recipe, write_jsonl

from refit.stages.core.config import CurateSpec, RecipeError, SourceSpec, load_recipe
from refit.stages.core.input_files import InputFileError, load_benchmark
from refit.stages.curate import records
from refit.stages.curate.records import read_records
from refit.stages.curate.stage import CurationError, run_curate, source_files
from refit.stages.evaluate import safety_probes as safety

SOURCE = SourceSpec(name="s", paths=["unused"], role="new")
CURATE = CurateSpec(min_chars=1)
GOOD = b'{"id": "a", "text": "a good document"}\n'


def read(path: Path, data: bytes, source: SourceSpec = SOURCE) -> list[tuple[int, str, str]]:
    """(line, reason or "kept", detail) of each record of a file holding data."""
    path.write_bytes(data)
    return [(r.line, r.reason or "kept", r.detail) for r in read_records(path, source, CURATE)]


# ----------------------------------------------------------------------------- source records


def test_json_nested_deeper_than_pythons_parser_allows_is_quarantined_not_raised(tmp_path):
    rows = read(tmp_path / "d.jsonl", GOOD + b'{"id": "b", "text": ' + b"[" * 100_000 + b"\n" + GOOD)
    assert [(line, reason) for line, reason, _ in rows] == [(1, "kept"), (2, "unparseable_json"), (3, "kept")]
    assert rows[1][2].startswith("RecursionError: maximum recursion depth exceeded")


def test_integer_of_more_than_4300_digits_is_quarantined_not_raised(tmp_path):
    rows = read(tmp_path / "d.jsonl", GOOD + b'{"id": "b", "text": "t", "n": ' + b"7" * 5000 + b"}\n" + GOOD)
    assert [(line, reason) for line, reason, _ in rows] == [(1, "kept"), (2, "unparseable_json"), (3, "kept")]
    assert "ValueError: Exceeds the limit (4300 digits) for integer string conversion" in rows[1][2]


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_line_over_the_cap_is_quarantined_unparsed(tmp_path, monkeypatch):
    monkeypatch.setattr(records, "MAX_LINE_BYTES", 1000)
    rows = read(tmp_path / "d.jsonl", GOOD + b'{"id": "b", "text": "' + b"x" * 5000 + b'"}\n' + GOOD)
    assert rows[1] == (2, "line_too_long", "a line of 5,023 bytes, over the limit of 1,000: not parsed")
    assert [reason for _, reason, _ in rows] == ["kept", "line_too_long", "kept"]


def test_zstd_file_that_expands_to_a_line_of_hundreds_of_megabytes_is_read_in_bounded_memory(tmp_path):
    """A 1 MiB read of a .zst was decompressed whole, and its lines held whole: a few kilobytes
    of zstd made hundreds of megabytes in memory. Now the line is dropped past the cap, and
    a zstd call returns at most 32 MiB: the peak is a few times the cap, whatever the line."""
    compressor, blob = zstandard.ZstdCompressor().compressobj(), io.BytesIO()
    blob.write(compressor.compress(GOOD + b'{"id": "b", "text": "'))
    for _ in range(300):
        blob.write(compressor.compress(b"x" * (1 << 20)))
    blob.write(compressor.compress(b'"}\n' + GOOD) + compressor.flush())
    path = _written(tmp_path / "bomb.jsonl.zst", blob.getvalue())
    tracemalloc.start()
    try:
        rows = [(r.line, r.reason or "kept") for r in read_records(path, SOURCE, CURATE)]
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [(1, "kept"), (2, "line_too_long"), (3, "kept")]
    assert peak < 4 * records.MAX_LINE_BYTES, f"peak {peak / 2**20:.0f} MiB"


def test_unreadable_file_row_names_the_first_line_not_read_even_after_blank_lines(tmp_path):
    """It named the line after the last record, though the blank lines after it were read."""
    stream = zlib.compressobj(wbits=31)  # gzip, flushed after the blank line, then cut there
    rows = read(tmp_path / "cut.jsonl.gz", stream.compress(GOOD + b"\n") + stream.flush(zlib.Z_SYNC_FLUSH))
    assert [(line, reason) for line, reason, _ in rows] == [(1, "kept"), (3, "unreadable_file")]


def test_parquet_value_python_cannot_hold_quarantines_its_row_not_the_file(tmp_path):
    """A timestamp past year 9999 made converting its record batch raise OverflowError."""
    source = SOURCE.model_copy(update={"format": "parquet"})
    table = pa.table({"id": ["a", "b", "c"], "text": pa.array([0, 2**50, 0], pa.timestamp("s"))})
    pq.write_table(table, tmp_path / "t.parquet")
    rows = [(r.line, r.reason) for r in read_records(tmp_path / "t.parquet", source, CURATE)]
    assert rows == [(1, "text_not_string"), (2, "unreadable_record"), (3, "text_not_string")]


# ----------------------------------------------------------------------------- paths a pattern matches


def _source(folder: Path, pattern: str = "*") -> SourceSpec:
    return SourceSpec(name="s", paths=[str(folder / pattern)], role="new")


def test_broken_link_matched_by_a_pattern_is_quarantined_not_skipped(tmp_path):
    os.symlink(tmp_path / "gone.jsonl", tmp_path / "a.jsonl")
    files, (row,) = source_files(_source(tmp_path))
    assert files == [] and (row.file, row.line, row.reason) == (str(tmp_path / "a.jsonl"), 1, "broken_link")
    assert row.detail == f"a link to {tmp_path / 'gone.jsonl'}, which does not exist"


def test_folder_matched_by_a_pattern_is_quarantined_not_skipped_unless_walked_by_double_star(tmp_path):
    (tmp_path / "sub.jsonl").mkdir()
    (tmp_path / "sub.jsonl" / "d.jsonl").write_bytes(GOOD)
    files, (row,) = source_files(_source(tmp_path, "*.jsonl"))
    assert files == [] and (row.reason, row.detail) == ("not_a_file", "a directory")
    assert source_files(_source(tmp_path, "**")) == ([tmp_path / "sub.jsonl" / "d.jsonl"], [])


def test_fifo_matched_by_a_pattern_is_quarantined_never_opened(tmp_path):
    """Opening a FIFO waits for a writer: reading one would hang the stage."""
    os.mkfifo(tmp_path / "pipe.jsonl")
    _, (row,) = source_files(_source(tmp_path))
    assert (row.reason, row.detail) == ("not_a_file", "a FIFO")
    assert [(r.reason, r.detail) for r in read_records(tmp_path / "pipe.jsonl", SOURCE, CURATE)] == [
        ("not_a_file", "a FIFO")
    ]


def test_file_name_not_utf8_is_quarantined_not_a_crash_of_the_listing(tmp_path):
    """Hashing the name for the memo raised UnicodeEncodeError while the input files were listed."""
    (tmp_path / os.fsdecode(b"caf\xe9.jsonl")).write_bytes(GOOD)
    _, (row,) = source_files(_source(tmp_path))
    assert (row.file, row.reason) == (f"{tmp_path}/caf\\xe9.jsonl", "file_name_not_utf8")


def test_curate_quarantines_every_path_it_cannot_read_and_counts_it_as_a_bad_record(tmp_path):
    """A broken link, a folder, a FIFO and a name that is not UTF-8 beside good files: the stage
    runs, each is one row of its source's quarantine, and the bad-fraction rule decides."""
    data = tmp_path / "data"
    write_jsonl(data / "good.jsonl", [{"id": f"g{i}", "text": d["text"]} for i, d in enumerate(NEW[:20])])
    os.symlink(data / "gone.jsonl", data / "broken.jsonl")
    (data / "folder.jsonl").mkdir()
    os.mkfifo(data / "pipe.jsonl")
    (data / os.fsdecode(b"caf\xe9.jsonl")).write_bytes(GOOD)
    source = {"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}
    report = run_curate(load_recipe(make_recipe(tmp_path, [source], max_bad_fraction=0.2)), tmp_path / "wd")
    rows = [json.loads(line) for line in (tmp_path / "wd/curate/quarantine/docs/batch-0001.jsonl").open()]
    assert sorted((Path(r["file"]).name, r["reason"]) for r in rows) == [
        ("broken.jsonl", "broken_link"),
        ("caf\\xe9.jsonl", "file_name_not_utf8"),
        ("folder.jsonl", "not_a_file"),
        ("pipe.jsonl", "not_a_file"),
    ]
    counts = report["sources"]["docs"]
    assert counts["records"] == 24 and counts["train_docs"] + counts["validation_docs"] == 20
    assert run_curate(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "wd")["batch"] == 1  # up to date
    os.symlink(data / "gone-too.jsonl", data / "broken-too.jsonl")  # a new problem is news, the old ones are not
    with pytest.raises(CurationError, match=r"source docs: 100\.0% of 1 records are bad .* broken_link 1;"):
        run_curate(load_recipe(tmp_path / "recipe.yaml"), tmp_path / "wd")


def test_curate_quarantines_json_pythons_parser_refuses_instead_of_failing_in_its_worker(tmp_path):
    good = [{"id": f"g{i}", "text": d["text"]} for i, d in enumerate(NEW[:10])]
    deep, digits = b'{"id": "x", "text": ' + b"[" * 50_000 + b"\n", b'{"id": "y", "text": ' + b"9" * 5000 + b"}\n"
    write_jsonl(tmp_path / "data" / "d.jsonl", good + [deep, digits])
    source = {"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}
    report = run_curate(load_recipe(make_recipe(tmp_path, [source], max_bad_fraction=0.5)), tmp_path / "wd")
    assert report["sources"]["docs"]["quarantined"] == {"unparseable_json": 2}


# ----------------------------------------------------------------------------- benchmark and probe files


def test_benchmark_item_missing_a_field_fails_curate_in_one_line_before_reading_instead_of_in_a_worker(tmp_path):
    write_jsonl(tmp_path / "data" / "d.jsonl", [{"id": "a", "text": NEW[0]["text"]}])
    recipe = load_recipe(make_recipe(tmp_path, [{"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}]))
    # changed after the recipe was validated (validation reads it too)
    (tmp_path / "bench.jsonl").write_text('{"id": "q1", "choices": [" a", " b"], "gold": 0}\n')
    with pytest.raises(CurationError, match=r"^benchmark .*bench\.jsonl, line 1: missing field\(s\) query; previous"):
        run_curate(recipe, tmp_path / "wd")


@pytest.mark.parametrize(
    "line, problem",
    [
        (b"{oops", "not JSON (Expecting property name enclosed in double quotes)"),
        (b"[" * 50_000, "not JSON (RecursionError: maximum recursion depth exceeded"),
        (b'{"id": "q", "query": "caf\xe9", "choices": [" a", " b"], "gold": 0}', "not UTF-8 (byte 25"),
        (b'{"id": "q", "query": "q", "choices": [" a", " b"], "gold": 2}', "gold 2 is not the index of one of the 2"),
        (b'{"id": "q", "query": "q", "choices": [" a", " b"], "gold": 1.0}', "gold 1.0 is not the index"),
        (b'{"id": "q", "query": "q", "choices": " a", "gold": 0}', "choices must be a list of at least two"),
        (b'{"id": ["q"], "query": "q", "choices": [" a", " b"], "gold": 0}', "id ['q'] is not a string or an int"),
    ],
    ids=["not-json", "nested-too-deep", "not-utf8", "gold-out-of-range", "gold-a-float", "choices-a-string", "id-list"],
)
def test_malformed_benchmark_item_is_an_error_naming_file_and_line(tmp_path, line, problem):
    """Read with json.loads: a traceback without file or line, or an item that failed mid-way
    through scoring (gold out of range, a float gold)."""
    good = b'{"id": "ok", "query": "q", "choices": [" a", " b"], "gold": 0}\n'
    path = _written(tmp_path / "bench.jsonl", good + line)
    with pytest.raises(InputFileError) as raised:
        load_benchmark(path)
    assert str(raised.value).startswith(f"{path}, line 2: {problem}")


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"\n\n", "line 1: no benchmark item in the file"),
        (b'{"id": 7, "query": "q", "choices": [" a", " b"], "gold": 0}\n' * 2, "line 2: id 7 repeats line 1"),
    ],
    ids=["empty", "repeated-id"],
)
def test_a_benchmark_without_items_or_with_a_repeated_id_is_refused(tmp_path, data, problem):
    """An empty benchmark scored nothing and averaged a NaN into the gain; a repeated id paired
    two items' scores as one."""
    path = _written(tmp_path / "bench.jsonl", data)
    with pytest.raises(InputFileError, match="^" + re.escape(f"{path}, {problem}")):
        load_benchmark(path)


def test_validate_reads_every_benchmark_item_and_names_the_field_and_the_problem(tmp_path):
    """A malformed item stops the recipe at `refit validate`, not at evaluate after training."""
    recipe = make_recipe(tmp_path, [{"name": "docs", "paths": ["bench.jsonl"], "role": "new"}])
    good = b'{"id": "ok", "query": "q", "choices": [" a", " b"], "gold": 0}\n'
    _written(tmp_path / "bench.jsonl", good + b'{"id": "q", "query": "q", "choices": [" a"], "gold": 0}\n')
    with pytest.raises(RecipeError) as raised:
        load_recipe(recipe)
    assert "evaluate.benchmarks[0].path" in str(raised.value)
    assert "bench.jsonl, line 2: choices must be a list of at least two non-empty strings" in str(raised.value)


def _bbq(**changes) -> bytes:
    return json.dumps(BBQ_ITEM | changes).encode() + b"\n"


@pytest.mark.parametrize(
    "data, problem",
    [
        (b"5\n", "line 1: a JSON int, not an object"),
        (b'"text"\n', "line 1: a JSON str, not an object"),
        (_bbq(answer_info={"ans0": [None], "ans1": ["x"], "ans2": ["unknown"]}), "line 1: answer_info needs a list"),
        (_bbq(additional_metadata={"stereotyped_groups": [1]}), "line 1: additional_metadata.stereotyped_groups"),
        (_bbq(ans0=7), "line 1: context, question, ans0, ans1 and ans2 must be strings"),
        (_bbq(label=1.0), "line 1: label 1.0 is not 0, 1 or 2"),
        (_bbq() + b'{"label": ' + b"1" * 5000 + b"}\n", "line 2: not JSON (ValueError: Exceeds the limit"),
        (_bbq() + b'{"context": "caf\xe9"}\n', "line 2: not UTF-8 (byte 16: invalid continuation byte)"),
    ],
    ids=["number", "string", "label-not-a-string", "group-not-a-string", "answer-not-a-string", "float-label",
         "long-integer", "not-utf8"],
)  # fmt: skip
def test_malformed_bbq_line_is_a_probe_file_error_naming_file_and_line(tmp_path, data, problem):
    """TypeError, AttributeError, ValueError or UnicodeDecodeError tracebacks before."""
    path = _written(tmp_path / "bbq.jsonl", data)
    with pytest.raises(safety.ProbeFileError, match="^" + re.escape(f"{path}, {problem}")):
        safety.load_bbq([path])


def test_truncated_gzip_probe_file_is_a_probe_file_error_naming_file_and_line(tmp_path):
    path = _written(tmp_path / "bbq.jsonl.gz", gzip.compress(_bbq() * 20)[:-30])
    with pytest.raises(safety.ProbeFileError, match=r"bbq\.jsonl\.gz, line \d+: cannot be read \(EOFError"):
        safety.load_bbq([path])


@pytest.mark.parametrize("loader", ["crows pairs", "prompts", "word list"])
def test_probe_file_not_utf8_is_a_probe_file_error_naming_file_and_line(tmp_path, loader):
    data = {
        "crows pairs": b",sent_more,sent_less,stereo_antistereo,bias_type\n0,caf\xe9,b,stereo,age\n",
        "prompts": b'{"text": "fine"}\n{"text": "caf\xe9"}\n',
        "word list": b"fine\ncaf\xe9\n",
    }[loader]
    load = {"crows pairs": safety.load_crows_pairs, "prompts": safety.load_prompts, "word list": safety.load_word_list}
    path = _written(tmp_path / "probe", data)
    with pytest.raises(safety.ProbeFileError, match=f"^{path}, line 2: not UTF-8"):
        load[loader](path)


def test_probe_path_that_is_a_fifo_is_refused_not_waited_on(tmp_path):
    os.mkfifo(tmp_path / "prompts.jsonl")
    with pytest.raises(safety.ProbeFileError, match=r"prompts\.jsonl, line 1: not a readable file"):
        safety.load_prompts(tmp_path / "prompts.jsonl")
