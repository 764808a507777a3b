"""tokenize: Arrow shards, packed, zero-copy, resumable, the same on any executor and batch size."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import NEW, arrow_peaks, write_jsonl
from transformers import AutoTokenizer

from refit.stages.core.config import load_recipe
from refit.stages.core.markers import MARKER, file_sha256
from refit.stages.core.shards import read_shard
from refit.stages.curate.stage import curated_files, curated_texts, run_curate
from refit.stages.tokenize.stage import run_tokenize


def test_shards_hold_packed_documents_and_open_zero_copy(curated, tiny_tokenizer_dir):
    recipe, workdir, _ = curated
    report = run_tokenize(recipe, workdir)
    index = json.loads((workdir / "tokenize" / "new" / "index.json").read_text())
    assert len(index["shards"]) >= 2 and index["dtype"] == "uint16"
    tokenizer = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    first = index["shards"][0]
    path = workdir / "tokenize" / "new" / first["file"]
    assert file_sha256(path) == first["sha256"]
    reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))  # IPC file format, uncompressed
    meta = reader.schema.metadata
    assert meta[b"seq_len"] == b"64" and meta[b"source"] == b"new" and meta[b"tokenizer_sha256"]
    rows = read_shard(path)
    assert rows.dtype == np.uint16 and rows.shape == (first["rows"], 64) and not rows.flags.owndata
    texts = [t for f in curated_files(workdir, "new", "train") for t in pa.parquet.read_table(f)["text"].to_pylist()]
    expected = [
        t
        for text in texts[: first["docs"]]
        for t in tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    ]
    assert rows.reshape(-1).tolist() == expected[: rows.size]  # documents joined by EOS, cut into rows
    assert report["sources"]["new"]["tokens"] == index["tokens"] == sum(s["tokens"] for s in index["shards"])


def test_rerun_skips_complete_shards_and_reproduces_them(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)
    shards = sorted((workdir / "tokenize").rglob("shard-*.arrow"))
    before = {p.name + p.parent.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in shards}
    # a run killed before its marker: the complete shards are still there and must be reused
    (workdir / "tokenize").rename(workdir / "tokenize.tmp")
    (workdir / "tokenize.tmp" / MARKER).unlink()
    removed = shards[0].relative_to(workdir / "tokenize")
    (workdir / "tokenize.tmp" / removed).unlink()
    run_tokenize(recipe, workdir)
    after = {
        p.name + p.parent.name: (p.read_bytes(), os.stat(p).st_mtime_ns)
        for p in sorted((workdir / "tokenize").rglob("shard-*.arrow"))
    }
    assert {k: v[0] for k, v in after.items()} == {k: v[0] for k, v in before.items()}  # byte-identical
    rewritten = {k for k in before if after[k][1] != before[k][1]}
    assert rewritten == {removed.name + removed.parent.name}  # only the missing shard was written again
    assert not (workdir / "tokenize.tmp").exists()


def test_a_batch_that_adds_nothing_to_a_source_tokenizes(curated, tmp_path):
    recipe, workdir, path = curated
    run_tokenize(recipe, workdir)
    # the nightly case: new files arrive for one source only; the other gets an empty batch
    write_jsonl(
        tmp_path / "data" / "new-day2.jsonl", [{"id": f"m{i}", "text": d["text"]} for i, d in enumerate(NEW[30:36])]
    )
    recipe = load_recipe(path.parent / "recipe.yaml")
    recipe = recipe.model_copy(
        update={
            "sources": [
                recipe.sources[0],
                recipe.sources[1].model_copy(update={"paths": [str(tmp_path / "data" / "new*.jsonl")]}),
            ]
        }
    )
    report = run_curate(recipe, workdir)
    assert report["batch"] == 2 and report["sources"]["old"]["records"] == 0
    assert [p.name for p in curated_files(workdir, "old", "train")] == ["train-0001.parquet", "train-0002.parquet"]
    tokens = run_tokenize(recipe, workdir)["sources"]
    assert tokens["old"]["rows"] == json.loads((workdir / "tokenize" / "old" / "index.json").read_text())["rows"] > 0


def test_curated_texts_reads_the_rows_asked_in_record_batches(tmp_path):
    path = tmp_path / "train-0001.parquet"
    texts = [f"document {i}" for i in range(50)]
    pq.write_table(pa.table({"id": [str(i) for i in range(50)], "text": texts}), path, row_group_size=7)
    for start, stop in [(0, 50), (5, 23), (14, 15), (49, 50), (20, 20)]:
        batches = [b.to_pylist() for b in curated_texts(path, 4, start, stop)]
        assert [t for b in batches for t in b] == texts[start:stop] and all(len(b) <= 4 for b in batches)
    assert [t for b in curated_texts(path, 1000) for t in b.to_pylist()] == texts


def test_shards_are_identical_whatever_the_record_batch_size(curated):
    recipe, workdir, _ = curated
    run_tokenize(recipe, workdir)  # batch_size 512: each curated file in one record batch
    whole = {p.name + p.parent.name: p.read_bytes() for p in (workdir / "tokenize").rglob("shard-*.arrow")}
    small = recipe.model_copy(update={"tokenize": recipe.tokenize.model_copy(update={"batch_size": 4})})
    assert len(pq.read_table(curated_files(workdir, "new", "train")[0])) > 4 * 4  # many record batches
    run_tokenize(small, workdir, force=True)
    assert {p.name + p.parent.name: p.read_bytes() for p in (workdir / "tokenize").rglob("shard-*.arrow")} == whole


def test_tokenize_memory_does_not_grow_with_the_curated_file(tmp_path, tiny_tokenizer_dir):
    small, large = arrow_peaks("tokenize", tmp_path, tiny_tokenizer_dir, (8, 64))
    # reading whole files, the peak grew with the text (2.5 bytes a byte: 24 -> 136 MiB); record batches keep it flat
    assert large - small < 8 * 2**20, f"Arrow peak {small / 2**20:.1f} MiB at 8 MiB of text, {large / 2**20:.1f} at 64"


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.xdist_group("ray")  # one private Ray cluster at a time: make test runs two workers
def test_shards_are_identical_on_one_or_two_local_workers_and_ray(curated):
    """tokenize runs its shard jobs as datatrove tasks on curate.executor."""
    ray = pytest.importorskip("ray", reason="the ray extra is part of dev: pip install -e '.[dev]'")
    recipe, workdir, _ = curated
    outputs = []
    for executor, workers in (("local", 1), ("local", 2), ("ray", 2)):
        where = recipe.model_copy(
            update={
                "curate": recipe.curate.model_copy(update={"executor": executor}),
                "tokenize": recipe.tokenize.model_copy(update={"workers": workers}),
            }
        )
        run_tokenize(where, workdir, force=True)
        outputs.append({str(p.relative_to(workdir)): p.read_bytes() for p in (workdir / "tokenize").rglob("*.arrow")})
        assert not (workdir / "tokenize" / "logs").exists()
    assert len(outputs[0]) >= 4 and outputs[0] == outputs[1] == outputs[2]
    assert not ray.is_initialized()


def test_a_document_longer_than_the_model_context_is_encoded_without_the_library_warning(
    tmp_path, tiny_tokenizer_dir, caplog
):
    """Refit packs whole documents into rows itself: transformers' "Token indices sequence length
    is longer than the specified maximum" would be noise in every run's log."""
    import shutil

    from refit.stages.tokenize.stage import load_tokenizer

    tokenizer_dir = shutil.copytree(tiny_tokenizer_dir, tmp_path / "tokenizer")
    settings = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({**settings, "model_max_length": 16}))
    ids = load_tokenizer(tokenizer_dir)("a long document " * 50)["input_ids"]
    assert len(ids) > 16 and "longer than the specified maximum" not in caplog.text
