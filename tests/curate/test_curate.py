"""curate: every bad-record class quarantined with its reason, dedupe within and across
sources (legacy kept), decontamination, held-out split, incremental reruns, atomicity."""

from __future__ import annotations

import errno
import gzip
import json
import os
import random
import shutil
import sqlite3
import zlib
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from conftest import LEGACY, NEW, edited, make_recipe, small_filesystem, write_jsonl

from refit.flows.cli import main as refit
from refit.stages.core import file_hashes
from refit.stages.core.config import load_recipe
from refit.stages.core.disk import full_disk_cause, full_disk_line
from refit.stages.core.text import word_ngrams
from refit.stages.curate.stage import (
    STAGE,
    CurationError,
    curated_files,
    data_version,
    run_curate,
)


def curated_ids(workdir: Path, source: str) -> set[str]:
    return {
        i
        for split in ("train", "validation")
        for f in curated_files(workdir, source, split)
        for i in pq.read_table(f)["id"].to_pylist()
    }


def quarantine(workdir: Path, source: str) -> list[dict]:
    return [
        json.loads(line)
        for f in sorted((workdir / "curate" / "quarantine" / source).glob("*.jsonl"))
        for line in f.read_text().splitlines()
    ]


def test_every_bad_record_class_is_quarantined_with_its_reason(tmp_path):
    good = [{"id": f"g{i}", "text": d["text"]} for i, d in enumerate([d for d in NEW if len(d["text"]) < 2000][:20])]
    bad = [
        b"{not json\n",
        b'{"id": "u1", "text": "caf\xe9 is not utf-8 \xff"}\n',
        b'["a", "list"]\n',
        {"id": "m1"},
        {"id": "e1", "text": "   \n\t  "},
        {"id": "n1", "text": 42},
        {"id": "c1", "text": "binary junk \x00\x01\x02 inside a document of decent length"},
        {"id": "s1", "text": "too short"},
        {"id": "g0", "text": "a different text reusing the id of the first good document"},
        {"text": "a document without any id field at all, long enough"},
        {"id": "L1", "text": "word " * 600},
    ]
    write_jsonl(tmp_path / "data" / "mixed.jsonl", good + bad)
    recipe = load_recipe(
        make_recipe(
            tmp_path,
            [{"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}],
            max_bad_fraction=0.5,
            max_chars=2500,
            long_documents="quarantine",
        )
    )
    report = run_curate(recipe, tmp_path / "wd")
    by_line = {q["line"]: q for q in quarantine(tmp_path / "wd", "docs")}
    expected = [
        "not_json",
        "invalid_utf8",
        "not_json_object",
        "missing_text",
        "empty_text",
        "text_not_string",
        "control_characters",
        "too_short",
        "duplicate_id",
        "missing_id",
        "too_long",
    ]
    assert [by_line[21 + i]["reason"] for i in range(len(bad))] == expected
    assert all(q["file"].endswith("mixed.jsonl") and q["source"] == "docs" and q["detail"] for q in by_line.values())
    assert "\\xff" in by_line[22]["excerpt"]
    assert report["sources"]["docs"]["quarantined"] == {reason: 1 for reason in expected}
    assert curated_ids(tmp_path / "wd", "docs") == {f"g{i}" for i in range(20)}  # every good record kept


def test_long_documents_are_split_when_asked(tmp_path):
    text = "\n\n".join(d["text"] for d in NEW[:6])
    write_jsonl(tmp_path / "data" / "long.jsonl", [{"id": "long", "text": text}])
    recipe = load_recipe(
        make_recipe(
            tmp_path,
            [{"name": "docs", "paths": ["data/long.jsonl"], "role": "new"}],
            max_chars=3000,
            validation_fraction=0.0,
        )
    )
    report = run_curate(recipe, tmp_path / "wd")
    (train,) = curated_files(tmp_path / "wd", "docs", "train")
    parts = pq.read_table(train).to_pylist()
    assert len(parts) >= 2 and report["sources"]["docs"]["split_parts"] == len(parts)
    assert all(len(p["text"]) <= 3000 and p["id"].startswith("long#part") for p in parts)


def test_compressed_and_parquet_sources(tmp_path):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:30])]
    write_jsonl(tmp_path / "data" / "a.jsonl.gz", docs[:10], opener=gzip.open)
    zstd = zstandard.ZstdCompressor().compress("".join(json.dumps(d) + "\n" for d in docs[10:20]).encode())
    (tmp_path / "data" / "b.jsonl.zst").write_bytes(zstd)
    pq.write_table(
        pa.table({"doc": [d["id"] for d in docs[20:]], "body": [d["text"] for d in docs[20:]]}),
        tmp_path / "data" / "c.parquet",
    )
    recipe = load_recipe(
        make_recipe(
            tmp_path,
            [
                {"name": "js", "paths": ["data/*.jsonl.*"], "role": "legacy"},
                {
                    "name": "pq",
                    "paths": ["data/c.parquet"],
                    "format": "parquet",
                    "text_field": "body",
                    "id_field": "doc",
                    "role": "new",
                },
            ],
        )
    )
    run_curate(recipe, tmp_path / "wd")
    assert curated_ids(tmp_path / "wd", "js") == {f"d{i}" for i in range(20)}
    assert curated_ids(tmp_path / "wd", "pq") == {f"d{i}" for i in range(20, 30)}


def test_dedupe_within_and_across_sources_keeps_legacy(tmp_path):
    legacy = [{"id": f"old{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:20])]
    new = [{"id": f"new{i}", "text": d["text"]} for i, d in enumerate(NEW[:20])]
    new += [{"id": f"newdup{i}", "text": edited(NEW[i]["text"], i)} for i in range(5)]  # near copies, same source
    new += [{"id": f"cross{i}", "text": edited(LEGACY[i]["text"], 100 + i)} for i in range(5)]  # near copies of legacy
    new += [{"id": "exact", "text": NEW[7]["text"]}]
    write_jsonl(tmp_path / "data" / "new.jsonl", new)  # the new source is declared first on purpose
    write_jsonl(tmp_path / "data" / "old.jsonl", legacy)
    recipe = load_recipe(
        make_recipe(
            tmp_path,
            [
                {"name": "new", "paths": ["data/new.jsonl"], "role": "new"},
                {"name": "old", "paths": ["data/old.jsonl"], "role": "legacy"},
            ],
        )
    )
    report = run_curate(recipe, tmp_path / "wd")
    assert curated_ids(tmp_path / "wd", "old") == {f"old{i}" for i in range(20)}
    assert curated_ids(tmp_path / "wd", "new") == {f"new{i}" for i in range(20)}
    assert report["sources"]["new"]["removed"] == {"exact_duplicate": 1, "near_duplicate": 10}
    removed = {
        r["id"]: r
        for line in (tmp_path / "wd/curate/removed/new/batch-0001.jsonl").read_text().splitlines()
        for r in [json.loads(line)]
    }
    assert [removed[f"cross{i}"]["of"] for i in range(5)] == [f"old:old{i}" for i in range(5)]
    assert [removed[f"newdup{i}"]["of"] for i in range(5)] == [f"new:new{i}" for i in range(5)]
    assert removed["exact"] == {"id": "exact", "reason": "exact_duplicate", "of": "new:new7"}


def test_contaminated_documents_are_removed_and_listed(tmp_path):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(NEW[:10])]
    docs.append(
        {
            "id": "leak",
            "text": "Some preamble. The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
        }
    )
    write_jsonl(tmp_path / "data" / "d.jsonl", docs)
    recipe = load_recipe(
        make_recipe(tmp_path, [{"name": "docs", "paths": ["data/d.jsonl"], "role": "new"}], decontaminate="document")
    )
    report = run_curate(recipe, tmp_path / "wd")
    assert report["sources"]["docs"]["contaminated_ids"] == ["leak"]
    assert report["sources"]["docs"]["contaminated_chars"] == len(docs[-1]["text"])
    removed = [
        json.loads(line) for line in (tmp_path / "wd/curate/removed/docs/batch-0001.jsonl").read_text().splitlines()
    ]
    assert removed == [
        {"id": "leak", "reason": "contaminated", "of": "b:q1", "chars": len(docs[-1]["text"]), "pieces": 0}
    ]


def test_span_decontamination_keeps_the_rest_of_a_document_sharing_one_ngram(tmp_path):
    """A long page quoting one benchmark sentence loses that sentence and a margin, not the page."""
    before, after = NEW[0]["text"], NEW[1]["text"]
    leak = "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat."
    page = f"{before}\n\n{leak}\n\n{after}"
    write_jsonl(tmp_path / "data" / "d.jsonl", [{"id": "page", "text": page}])
    recipe = load_recipe(
        make_recipe(
            tmp_path,
            [{"name": "docs", "paths": ["data/d.jsonl"], "role": "new"}],
            validation_fraction=0.0,
            decontaminate_margin=2,
        )
    )
    report = run_curate(recipe, tmp_path / "wd")["sources"]["docs"]
    kept = pq.read_table(curated_files(tmp_path / "wd", "docs", "train")[0]).to_pylist()
    assert [d["id"] for d in kept] == ["page#clean0", "page#clean1"]
    words = before.split()
    assert kept[0]["text"].split() == words[:-2]  # the margin: the last two words before the shared 13-gram go too
    assert kept[1]["text"].split()[-20:] == after.split()[-20:]
    assert report["contaminated_ids"] == ["page"] and report["contaminated_docs"] == 1
    assert 0 < report["contaminated_chars"] == len(page) - len(kept[0]["text"]) - len(kept[1]["text"]) < len(page) / 4
    for doc in kept:  # nothing left that the audit would find
        assert not word_ngrams(doc["text"], 13) & word_ngrams(leak, 13)


def test_validation_split_is_deterministic_by_id(tmp_path):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:40])]
    write_jsonl(tmp_path / "data" / "d.jsonl", docs)
    recipe = load_recipe(
        make_recipe(tmp_path, [{"name": "docs", "paths": ["data/d.jsonl"], "role": "legacy"}], validation_fraction=0.25)
    )
    run_curate(recipe, tmp_path / "a")
    run_curate(recipe, tmp_path / "b", force=True)
    split = [
        pq.read_table(curated_files(w, "docs", "validation")[0])["id"].to_pylist()
        for w in (tmp_path / "a", tmp_path / "b")
    ]
    assert split[0] == split[1] and 3 <= len(split[0]) <= 20


def test_hash_split_holds_out_enough_tokens_per_source_and_warns_when_it_cannot(tmp_path):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:60])]
    write_jsonl(tmp_path / "data" / "d.jsonl", docs)
    total = sum(len(d["text"]) for d in docs)
    source = [{"name": "docs", "paths": ["data/d.jsonl"], "role": "legacy"}]
    enough = dict(validation_fraction=0.01, min_validation_tokens=total // 40, chars_per_token=2.0)
    report = run_curate(load_recipe(make_recipe(tmp_path, source, **enough)), tmp_path / "a")
    held = report["sources"]["docs"]["validation"]
    assert held["split"] == "hash" and held["chars"] >= total / 20 and held["estimated_tokens"] >= total // 40
    assert held["chars"] <= 0.1 * total and not report["warnings"]  # within max_validation_fraction
    assert held["docs"] == report["sources"]["docs"]["validation_docs"] > 0.01 * 60
    short = dict(validation_fraction=0.01, min_validation_tokens=total, max_validation_fraction=0.2)
    report = run_curate(load_recipe(make_recipe(tmp_path, source, **short)), tmp_path / "b")
    assert report["sources"]["docs"]["validation"]["chars"] <= 0.2 * total
    (warning,) = report["warnings"]
    assert warning.startswith("docs: validation set of") and "below curate.min_validation_tokens" in warning


def test_explicit_validation_files_replace_the_hash_split_and_their_copies_leave_training(tmp_path):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:20])]
    write_jsonl(tmp_path / "data" / "d.jsonl", docs)
    held_out = [{"id": f"v{i}", "text": d["text"]} for i, d in enumerate(LEGACY[20:25])]
    write_jsonl(tmp_path / "heldout" / "v.jsonl", [*held_out, {"id": "v-bad", "text": 3}])
    write_jsonl(tmp_path / "data" / "d2.jsonl", [{"id": "copy", "text": held_out[0]["text"]}])  # trained on: no
    source = {"name": "docs", "paths": ["data/d*.jsonl"], "validation_paths": ["heldout/*.jsonl"], "role": "legacy"}
    report = run_curate(load_recipe(make_recipe(tmp_path, [source])), tmp_path / "wd")
    validation = pq.read_table(curated_files(tmp_path / "wd", "docs", "validation")[0]).to_pylist()
    assert [d["id"] for d in validation] == [f"v{i}" for i in range(5)]
    assert report["sources"]["docs"]["validation"]["split"] == "files"
    counts = report["sources"]["docs"]
    assert counts["train_docs"] == 20 and counts["removed"] == {"exact_duplicate": 1}
    assert [q["reason"] for q in quarantine(tmp_path / "wd", "docs")] == ["text_not_string"]


def test_incremental_rerun_processes_only_new_files_against_everything_seen(tmp_path):
    write_jsonl(tmp_path / "data" / "day1.jsonl", [{"id": f"a{i}", "text": d["text"]} for i, d in enumerate(NEW[:15])])
    recipe_path = make_recipe(
        tmp_path, [{"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}], max_bad_fraction=0.2
    )
    first = run_curate(load_recipe(recipe_path), tmp_path / "wd")
    assert run_curate(load_recipe(recipe_path), tmp_path / "wd") == first  # unchanged: done marker reused
    day2 = [{"id": f"b{i}", "text": d["text"]} for i, d in enumerate(NEW[15:25])]
    day2 += [{"id": "b-copy", "text": edited(NEW[3]["text"], 7)}, {"id": "a0", "text": NEW[30]["text"]}]
    write_jsonl(tmp_path / "data" / "day2.jsonl", day2)
    second = run_curate(load_recipe(recipe_path), tmp_path / "wd")
    docs = second["sources"]["docs"]
    assert second["incremental"] and second["batch"] == 2
    assert [Path(f).name for f in docs["files"]] == ["day2.jsonl"] and docs["records"] == 12
    assert docs["removed"] == {"near_duplicate": 1} and docs["quarantined"] == {"duplicate_id": 1}
    (removed,) = (tmp_path / "wd/curate/removed/docs/batch-0002.jsonl").read_text().splitlines()
    assert json.loads(removed) == {"id": "b-copy", "reason": "near_duplicate", "of": "a document of an earlier batch"}
    assert curated_ids(tmp_path / "wd", "docs") == {f"a{i}" for i in range(15)} | {f"b{i}" for i in range(10)}


def test_too_many_bad_records_fail_and_keep_the_previous_output(tmp_path):
    write_jsonl(tmp_path / "data" / "day1.jsonl", [{"id": f"a{i}", "text": d["text"]} for i, d in enumerate(NEW[:10])])
    recipe_path = make_recipe(
        tmp_path, [{"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}], max_bad_fraction=0.2
    )
    run_curate(load_recipe(recipe_path), tmp_path / "wd")
    before = {p: p.read_bytes() for p in (tmp_path / "wd" / "curate").rglob("*") if p.is_file()}
    write_jsonl(
        tmp_path / "data" / "day2.jsonl", [b"garbage\n"] * 6 + [{"id": "ok", "text": NEW[20]["text"]}, {"id": "x"}]
    )
    with pytest.raises(
        CurationError, match=r"source docs: 87\.5% of 8 records are bad .* top reasons: not_json 6, missing_text 1"
    ):
        run_curate(load_recipe(recipe_path), tmp_path / "wd")
    after = {p: p.read_bytes() for p in (tmp_path / "wd" / "curate").rglob("*") if p.is_file()}
    assert after == before and not (tmp_path / "wd" / "curate.tmp").exists()


def _jsonl_bytes(docs: list[dict]) -> bytes:
    return "".join(json.dumps(d) + "\n" for d in docs).encode()


def curate_lines(tmp_path: Path, lines: list, **curate) -> tuple[dict, list[dict], Path]:
    """Curate one JSONL file of 10 good documents followed by lines; (report, quarantine rows, file)."""
    good = [{"id": f"g{i}", "text": d["text"]} for i, d in enumerate(NEW[:10])]
    path = write_jsonl(tmp_path / "data" / "d.jsonl", good + lines)
    recipe = load_recipe(
        make_recipe(tmp_path, [{"name": "docs", "paths": ["data/*"], "role": "new"}], max_bad_fraction=0.5, **curate)
    )
    return run_curate(recipe, tmp_path / "wd"), quarantine(tmp_path / "wd", "docs"), path


def test_lone_surrogate_is_quarantined_as_invalid_unicode(tmp_path):
    report, rows, path = curate_lines(
        tmp_path,
        [
            b'{"id": "s1", "text": "a lone \\ud800 surrogate inside a document of decent length"}\n',
            b'{"id": "s2\\udfff", "text": "a lone surrogate in the id of a document of decent length"}\n',
        ],
    )
    assert [(r["file"], r["line"], r["reason"]) for r in rows] == [
        (str(path), 11, "invalid_unicode"),
        (str(path), 12, "invalid_unicode"),
    ]
    assert "U+D800 at offset 7" in rows[0]["detail"] and "\\ud800" in rows[0]["excerpt"]
    assert "'id': lone surrogate U+DFFF" in rows[1]["detail"]
    assert report["sources"]["docs"]["quarantined"] == {"invalid_unicode": 2}
    assert curated_ids(tmp_path / "wd", "docs") == {f"g{i}" for i in range(10)}


def test_byte_order_mark_is_stripped_and_the_first_record_kept(tmp_path):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(NEW[:5])]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + _jsonl_bytes(docs))
    recipe = load_recipe(make_recipe(tmp_path, [{"name": "docs", "paths": ["data/bom.jsonl"], "role": "new"}]))
    report = run_curate(recipe, tmp_path / "wd")
    assert report["sources"]["docs"]["quarantined"] == {}
    assert curated_ids(tmp_path / "wd", "docs") == {f"d{i}" for i in range(5)}


def test_duplicate_id_is_quarantined_even_after_a_bad_first_record_and_names_the_kept_one(tmp_path):
    report, rows, path = curate_lines(
        tmp_path,
        [
            {"id": "x", "text": "too short"},  # line 11: bad, but it claims the id
            {"id": "x", "text": NEW[20]["text"]},  # line 12: a good record reusing it
            {"id": "g3", "text": NEW[21]["text"]},  # line 13: reuses the id of line 4, which is kept
        ],
    )
    short, after_bad, after_good = rows
    assert (short["line"], short["reason"]) == (11, "too_short")
    assert (after_bad["line"], after_bad["reason"], after_bad["kept"]) == (12, "duplicate_id", None)
    assert f"{path}:11, quarantined there as too_short; no record with this id is kept" in after_bad["detail"]
    assert (after_good["line"], after_good["reason"], after_good["kept"]) == (13, "duplicate_id", f"{path}:4")
    assert report["sources"]["docs"]["quarantined"] == {"too_short": 1, "duplicate_id": 2}
    assert curated_ids(tmp_path / "wd", "docs") == {f"g{i}" for i in range(10)}


def test_null_text_is_reported_as_null_not_missing(tmp_path):
    report, rows, _ = curate_lines(tmp_path, [{"id": "n", "text": None}, {"id": "m"}, {"id": None, "text": "t" * 30}])
    assert [(r["reason"], r["detail"]) for r in rows] == [
        ("null_text", "'text' is null"),
        ("missing_text", "no 'text' field"),
        ("missing_id", "'id' is null"),
    ]
    assert report["sources"]["docs"]["quarantined"] == {"null_text": 1, "missing_text": 1, "missing_id": 1}


def _truncated_gzip(path: Path, docs: list[dict]) -> int:
    data = gzip.compress(_jsonl_bytes(docs))[:-5000]
    path.write_bytes(data)
    return zlib.decompressobj(31).decompress(data).count(b"\n")  # the lines whole before the cut


def _truncated_zstd(path: Path, docs: list[dict]) -> int:
    """Three frames (as zstd writes concatenated files); cut inside the third."""
    frames = [zstandard.ZstdCompressor().compress(_jsonl_bytes(docs[i : i + 10])) for i in (0, 10, 20)]
    path.write_bytes(frames[0] + frames[1] + frames[2][: len(frames[2]) // 2])
    return 20


def _damaged_parquet(path: Path, docs: list[dict]) -> int:
    """Three row groups of 10; the page header of the last one's text column overwritten."""
    pq.write_table(pa.Table.from_pylist(docs), path, row_group_size=10)
    column = pq.ParquetFile(path).metadata.row_group(2).column(1)
    data = bytearray(path.read_bytes())
    data[column.data_page_offset : column.data_page_offset + 16] = b"\xff" * 16
    path.write_bytes(bytes(data))
    return 20


@pytest.mark.parametrize(
    "name,damage,error",
    [
        ("cut.jsonl.gz", _truncated_gzip, "EOFError"),
        ("cut.jsonl.zst", _truncated_zstd, "EOFError: zstd stream ended inside a frame"),
        ("damaged.parquet", _damaged_parquet, "OSError"),
    ],
)
def test_damaged_file_keeps_the_records_before_the_damage_and_is_quarantined(tmp_path, name, damage, error):
    docs = [{"id": f"d{i}", "text": d["text"]} for i, d in enumerate(LEGACY[:30])]
    (tmp_path / "data").mkdir()
    path = tmp_path / "data" / name
    whole = damage(path, docs)
    assert 0 < whole < len(docs)
    fmt = "parquet" if name.endswith(".parquet") else "jsonl"
    source = {"name": "docs", "paths": [f"data/{name}"], "role": "legacy", "format": fmt}
    recipe = load_recipe(make_recipe(tmp_path, [source], max_bad_fraction=0.5))
    report = run_curate(recipe, tmp_path / "wd")
    assert curated_ids(tmp_path / "wd", "docs") == {f"d{i}" for i in range(whole)}
    (row,) = quarantine(tmp_path / "wd", "docs")
    assert (row["file"], row["line"], row["reason"]) == (str(path), whole + 1, "unreadable_file")
    assert row["detail"].startswith(f"unreadable after line {whole}: {error}")
    counts = report["sources"]["docs"]
    assert counts["records"] == whole + 1 and counts["bad_fraction"] == pytest.approx(1 / (whole + 1), abs=1e-6)


def test_an_unreadable_file_counts_towards_the_bad_fraction(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.jsonl.gz").write_bytes(gzip.compress(_jsonl_bytes([{"id": "a", "text": NEW[0]["text"]}])))
    (tmp_path / "data" / "b.jsonl.gz").write_bytes(b"\x1f\x8b not gzip data")
    recipe = load_recipe(make_recipe(tmp_path, [{"name": "docs", "paths": ["data/*"], "role": "new"}]))
    with pytest.raises(CurationError, match=r"source docs: 50\.0% of 2 records are bad .* unreadable_file 1"):
        run_curate(recipe, tmp_path / "wd")


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MiB tmpfs to fill."""
    with small_filesystem(tmp_path / "small-disk", 3 << 20) as mount:
        yield mount


# seen here: the disk fills in datatrove's task log (3 MiB), the read records (4) and the MinHash step (10)
@pytest.mark.parametrize("megabytes", [3, 4, 10])
def test_disk_full_is_one_line_naming_the_stage_and_keeps_the_previous_output(tmp_path, megabytes, capsys):
    with small_filesystem(tmp_path / "small-disk", megabytes << 20) as small_disk:
        _curate_onto_a_full_disk(tmp_path, small_disk, capsys)


def _curate_onto_a_full_disk(tmp_path, small_disk, capsys):
    write_jsonl(tmp_path / "data" / "day1.jsonl", [{"id": f"a{i}", "text": d["text"]} for i, d in enumerate(NEW[:10])])
    recipe_path = make_recipe(tmp_path, [{"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}])
    workdir = small_disk / "wd"
    run_curate(load_recipe(recipe_path), workdir)
    before = {p: p.read_bytes() for p in (workdir / "curate").rglob("*") if p.is_file()}
    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(2, 9))) for _ in range(5000)]
    big = [{"id": f"b{i}", "text": " ".join(rng.choices(words, k=400))} for i in range(1500)]  # ~4 MB, unique
    write_jsonl(tmp_path / "data" / "day2.jsonl", big)
    capsys.readouterr()
    assert refit(["stage", "curate", str(recipe_path), "--workdir", str(workdir)]) == 1
    err = capsys.readouterr().err
    (message,) = [line for line in err.splitlines() if line.startswith("error: ")]
    assert "Traceback" not in err, err
    assert message.startswith(f"error: curate: no space left on device writing {workdir}/curate.tmp"), message
    assert message.endswith(f"the previous curate output in {workdir}/curate is unchanged")
    after = {p: p.read_bytes() for p in (workdir / "curate").rglob("*") if p.is_file()}
    assert after == before and not (workdir / "curate.tmp").exists()


def test_a_full_disk_is_recognised_as_sqlite_arrow_and_duckdb_report_it(small_disk):
    (small_disk / "filler").write_bytes(b"\0" * (3 * 2**20 - 64 * 2**10))  # 64 KiB left
    with pytest.raises(OSError) as arrow:
        pq.write_table(pa.table({"text": [random.randbytes(1000).hex() for _ in range(100)]}), small_disk / "x.parquet")
    db = sqlite3.connect(small_disk / "state.sqlite")
    db.execute("CREATE TABLE texts (hash TEXT)")
    with pytest.raises(sqlite3.OperationalError) as sqlite, db:
        db.executemany("INSERT INTO texts VALUES (?)", [(random.randbytes(100).hex(),) for _ in range(1000)])
    db.close()
    with pytest.raises(duckdb.Error) as duck:  # as curate's exact dedupe writes its tables
        with duckdb.connect(str(small_disk / "dedupe.duckdb")) as connection:
            connection.execute("CREATE TABLE texts AS SELECT md5(i::VARCHAR) AS hash FROM range(1000000) t(i)")
            connection.execute("CHECKPOINT")
    assert full_disk_cause(arrow.value) and full_disk_cause(sqlite.value) and full_disk_cause(duck.value)
    assert full_disk_line(str(duck.value)), duck.value  # the line that says so, out of DuckDB's several
    assert not full_disk_cause(OSError(errno.EACCES, "Permission denied"))
    assert not full_disk_cause(sqlite3.OperationalError("x"))


def test_files_are_known_by_their_content_not_their_mtime(tmp_path, monkeypatch):
    day1 = write_jsonl(
        tmp_path / "data" / "day1.jsonl", [{"id": f"a{i}", "text": d["text"]} for i, d in enumerate(NEW[:10])]
    )
    recipe = load_recipe(make_recipe(tmp_path, [{"name": "docs", "paths": ["data/*.jsonl"], "role": "new"}]))
    workdir = tmp_path / "wd"
    first = run_curate(recipe, workdir)
    version, fingerprint = data_version(recipe, workdir), STAGE.input_fingerprint(recipe, workdir)
    hashed = []
    monkeypatch.setattr(
        file_hashes, "file_sha256", lambda path, real=file_hashes.file_sha256: hashed.append(path) or real(path)
    )
    assert STAGE.input_fingerprint(recipe, workdir) == fingerprint and hashed == []  # unchanged files: not read again

    day1.write_bytes(day1.read_bytes())  # copied again: same bytes, new mtime
    os.utime(day1, ns=(day1.stat().st_atime_ns, day1.stat().st_mtime_ns + 10**9))
    copy = tmp_path / "data" / "day1-copy.jsonl"
    shutil.copy(day1, copy)
    assert STAGE.input_fingerprint(recipe, workdir) == fingerprint and data_version(recipe, workdir) == version
    assert sorted(hashed) == [copy, day1]  # each hashed once, then cached
    assert run_curate(recipe, workdir) == first and not (workdir / "curate" / "docs" / "train-0002.parquet").exists()

    write_jsonl(tmp_path / "data" / "day2.jsonl", [{"id": "b0", "text": NEW[11]["text"]}])  # new data: a batch
    second = run_curate(recipe, workdir)["sources"]["docs"]
    assert [Path(f).name for f in second["files"]] == ["day2.jsonl"] and second["records"] == 1
    assert second["copies_of_curated_files"] == [str(copy)]  # recorded, not read again

    write_jsonl(day1, [{"id": "a0", "text": NEW[12]["text"]}])
    with pytest.raises(CurationError, match=r"day1\.jsonl changed since it was curated; .* rerun with --force"):
        run_curate(recipe, workdir)


def reference_hash_split(docs: list[tuple[str, str]], spec, held_chars: int) -> list[str]:
    """The held-out ids as the split is defined, over a list in memory (what curate did before
    it streamed): in id-hash order, below validation_fraction or while short of the target."""
    from refit.stages.curate.stage import _bucket

    if spec.validation_fraction == 0:
        return []
    target = spec.min_validation_tokens * spec.chars_per_token - held_chars
    limit = spec.max_validation_fraction * sum(len(text) for _, text in docs)
    chosen, taken = set(), 0
    for doc_id, text in sorted(docs, key=lambda doc: _bucket(doc[0])):
        if _bucket(doc_id) < spec.validation_fraction or (taken < target and taken + len(text) <= limit):
            chosen.add(doc_id)
            taken += len(text)
    return [doc_id for doc_id, _ in docs if doc_id in chosen]


@pytest.mark.parametrize(
    ("fraction", "min_tokens", "max_fraction", "held"),
    [
        (0.02, 10, 0.1, 0),
        (0.02, 20_000, 0.1, 0),
        (0.05, 20_000, 0.3, 9_000),
        (0.0, 20_000, 0.1, 0),
        (0.5, 10**6, 0.2, 0),
    ],
)
def test_streamed_hash_split_holds_out_what_the_split_over_a_list_did(
    tmp_path, fraction, min_tokens, max_fraction, held
):
    from refit.stages.core.config import CurateSpec
    from refit.stages.curate.stage import HashSplit

    rng = random.Random(3)
    docs = [(f"doc{i}", "x" * rng.randint(50, 3000)) for i in range(2000)]
    spec = CurateSpec(
        validation_fraction=fraction, min_validation_tokens=min_tokens, max_validation_fraction=max_fraction
    )
    split = HashSplit(tmp_path / "split.parquet", spec, held)
    for doc_id, text in docs:  # first pass: counted, not kept
        split.count(doc_id, len(text))
    split.choose(threads=2)
    held_out = [doc_id for doc_id, _ in docs if split.held_out(doc_id)]
    assert held_out == reference_hash_split(docs, spec, held)
    assert bool(held_out) == (fraction > 0)


def test_exact_duplicates_are_found_on_disk_within_a_batch_across_batches_and_against_validation_files(
    tmp_path, monkeypatch
):
    from refit.stages.curate import steps as curate_steps

    monkeypatch.setattr(curate_steps, "ROWS_PER_GROUP", 4)  # several row groups in each curated file
    docs = [{"id": f"a{i}", "text": d["text"]} for i, d in enumerate(NEW[:12])]
    docs += [{"id": "copy-of-a2", "text": NEW[2]["text"]}, {"id": "copy-of-v0", "text": LEGACY[30]["text"]}]
    write_jsonl(tmp_path / "data" / "day1.jsonl", docs)
    write_jsonl(tmp_path / "heldout" / "v.jsonl", [{"id": "v0", "text": LEGACY[30]["text"]}])
    source = {"name": "docs", "paths": ["data/*.jsonl"], "validation_paths": ["heldout/*.jsonl"], "role": "new"}
    recipe = load_recipe(make_recipe(tmp_path, [source], workers=2))
    first = run_curate(recipe, tmp_path / "wd")["sources"]["docs"]
    assert first["removed"] == {"exact_duplicate": 2} and first["train_docs"] == 12
    (train,) = curated_files(tmp_path / "wd", "docs", "train")
    assert pq.ParquetFile(train).num_row_groups == 3
    assert pq.read_table(train)["id"].to_pylist() == [f"a{i}" for i in range(12)]  # input order, streamed
    write_jsonl(
        tmp_path / "data" / "day2.jsonl", [{"id": "b0", "text": NEW[5]["text"]}, {"id": "b1", "text": NEW[20]["text"]}]
    )
    second = run_curate(recipe, tmp_path / "wd")["sources"]["docs"]
    assert second["removed"] == {"exact_duplicate": 1} and second["train_docs"] == 1
    removed = [
        json.loads(line)
        for batch in (1, 2)
        for line in (tmp_path / f"wd/curate/removed/docs/batch-{batch:04d}.jsonl").read_text().splitlines()
    ]
    assert removed == [
        {"id": "copy-of-a2", "reason": "exact_duplicate", "of": "docs:a2"},
        {"id": "copy-of-v0", "reason": "exact_duplicate", "of": "docs:validation:v0"},
        {"id": "b0", "reason": "exact_duplicate", "of": "docs:a5"},
    ]
    assert not (tmp_path / "wd" / "curate" / "work").exists()  # the spools are gone with the run
